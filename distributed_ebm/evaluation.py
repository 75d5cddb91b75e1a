"""Single-process evaluation: load what an `AttackConfig` names, attack batch by batch, write results.

Results under cfg.output: `records.parquet` (one row per image) and `summary.json`, each written
atomically. The distributed engine runs the same `Attack` on Ray actors.
"""
from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import storage
from .attacks import Attack, ImageRecord, summarize
from .config import AttackConfig
from .data import ImageSet, load
from .defense import Purifier
from .nets import load_classifier, load_ebm
from .progress import Progress
from .report import plot_curves


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_attack(cfg: AttackConfig, device: torch.device | str = "cpu", on_point=None) -> Attack:
    """Classifier, purifier and attack as the config says (weights loaded with weights_only=True)."""
    c = cfg.classifier
    if c.weights is None:
        raise ValueError("classifier.weights is not set: an attack needs a trained classifier")
    clf = load_classifier(c.arch, c.weights, c.num_classes, c.mean, c.std, c.wrn_depth, c.wrn_widen).to(device)
    purifier = None
    if cfg.attack.mode != "pgd":
        ebm = load_ebm(cfg.ebm, image_size=cfg.data.image_size).to(device) if cfg.ebm else None
        p = cfg.purify
        purifier = Purifier(ebm, p.steps, p.step_size, p.noise)
    return Attack(clf, purifier, cfg.attack, seed=cfg.seed, chunk_size=cfg.chunk_size, on_point=on_point)


def records_table(records: list[ImageRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records])


def write_parquet(table: pa.Table, url: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(url, sink.getvalue().to_pybytes())


def run_attack(cfg: AttackConfig, device: str = "auto", data: ImageSet | None = None, show: bool = True,
               write: bool = True) -> dict:
    """Attack every selected image in batches; returns the summary (and writes records + summary)."""
    device = pick_device(device)
    data = data if data is not None else load(cfg.data)
    attack = build_attack(cfg, device)
    bar = Progress(len(data), f"attack:{cfg.attack.mode}", enabled=show, unit="img")
    t0, records = time.time(), []
    for i in range(0, len(data), cfg.batch_size):
        batch = data.take(torch.arange(i, min(i + cfg.batch_size, len(data))))
        records += attack(batch.images.to(device), batch.labels.to(device), batch.ids)
        done = summarize(records, attack.points)
        bar.update(len(batch), robust=done["robust_accuracy"], natural=done["natural_accuracy"])
    bar.close()
    summary = {**summarize(records, attack.points), "mode": cfg.attack.mode, "seconds": time.time() - t0,
               "config": cfg.model_dump(mode="json")}
    if write:
        write_parquet(records_table(records), storage.join(cfg.output, "records.parquet"))
        storage.write_bytes(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=2).encode())
        plot_curves([summary], storage.join(cfg.output, "accuracy.png"))
    summary["records"] = records
    return summary
