"""Single-process evaluation: load what an `AttackConfig` names, attack batch by batch, write results.

The reference the Ray engine (`distributed.evaluate`) is measured against: same `Attack`, same
per-batch record files, same summary. Resumes like it: images with records are skipped.
Images, labels and ids of a batch go to the attack's device together (the engine's device rule).
"""
from __future__ import annotations

import time

import torch

from ..results import records as results
from ..method.attacks.modes import MODES
from ..method.attacks import Attack, EnsembleAttack
from ..errors import InputError
from ..config import AttackConfig
from ..store.data import ImageSet, load, unit_range
from ..method.defense import Purifier
from ..method.cuda import PRECISIONS, job_device, set_arithmetic
from ..method.memory import auto_chunk_size
from ..store.weights import load_classifier, load_ebm
from ..store.progress import Progress
from ..store.provenance import attack_settings


def dtype_of(cfg: AttackConfig) -> torch.dtype:
    """The dtype of images, chains and classifier (bf16 keeps them in float32: only the EBM autocasts)."""
    return PRECISIONS[cfg.precision].dtype


def build_attack(cfg: AttackConfig, device: torch.device | str = "cpu", gradient_ids=()) -> Attack | EnsembleAttack:
    """Classifier, purifier and attack as the config says (weights loaded with weights_only=True).

    Also the pre-flight check: a missing file, a checkpoint of another architecture or for
    another image size fails here, with a message naming it.
    """
    c, dtype = cfg.classifier, dtype_of(cfg)
    set_arithmetic(device, cfg.precision)
    if c.weights is None:
        raise InputError("classifier.weights is not set: an attack needs a trained classifier")
    clf = load_classifier(c.arch, c.weights, c.num_classes, c.mean, c.std, c.wrn_depth, c.wrn_widen)
    clf = clf.to(device=device, dtype=dtype, memory_format=torch.channels_last)  # the chains' layout
    purifier = None
    if cfg.attack.defended:
        n = cfg.ebm_net  # every data source here is RGB, as the classifiers are
        ebm = (load_ebm(cfg.ebm, cfg.data.image_size, channels=3, activation=n.activation, soft_alpha=n.soft_alpha,
                        soft_eps=n.soft_eps).to(device=device, dtype=dtype) if cfg.ebm else None)
        p = cfg.purify
        purifier = Purifier(ebm, p.steps, p.step_size, p.noise, amp=PRECISIONS[cfg.precision].amp)
    chunk = cfg.chunk_size
    if chunk is None:  # an exact gradient's footprint grows with the chain length: the fixed default there
        chunk = 1024 if any(MODES[m.mode].exact for m in cfg.attack.members()) else auto_chunk_size(
            purifier, clf, (3, cfg.data.image_size, cfg.data.image_size), device, dtype)
    kind = EnsembleAttack if cfg.attack.worst_case else Attack
    return kind(clf, purifier, cfg.attack, seed=cfg.seed, chunk_size=chunk, gradient_ids=gradient_ids)


def batches(data: ImageSet, size: int):
    for i in range(0, len(data), size):
        yield data.take(torch.arange(i, min(i + size, len(data))))


def pending(data: ImageSet, output: str, settings: dict) -> ImageSet:
    """The images without a record under output (all of them on a first run); the records there must
    have been written with the same settings."""
    results.check_settings(output, settings)
    done = results.done_ids(output)
    keep = [k for k, i in enumerate(data.ids.tolist()) if i not in done]
    return data.take(keep)


def run_attack(cfg: AttackConfig, device: str = "auto", data: ImageSet | None = None, show: bool = True) -> dict:
    """Attack every selected image without a record yet; returns the summary of all records."""
    device = job_device(device)
    data = data if data is not None else load(cfg.data)
    attack = build_attack(cfg, device, sample_ids(data, cfg.report.gradient_check))
    settings = attack_settings(cfg)
    todo = pending(data, cfg.output, settings)
    bar = Progress(len(data), f"attack:{cfg.attack.name}", start=len(data) - len(todo), enabled=show, unit="img")
    t0, broken = time.time(), 0  # broken: this run's images, counted across batches
    for batch in batches(todo, cfg.batch_size):
        images = unit_range(batch.data, device).to(dtype_of(cfg))  # uint8 to the device, floats there
        records = attack(images, batch.labels.to(device), batch.ids.to(device))
        results.write_part(cfg.output, records, settings)
        broken += sum(not r.robust for r in records)
        bar.update(len(records), broken=broken)
    bar.close()
    return results.finalize(cfg, time.time() - t0, set(data.ids.tolist()), set(todo.ids.tolist()))


def sample_ids(data, n: int) -> list[int]:
    """The first `n` images of the run by id (a gallery's, a gradient check's): two runs on a selection compare."""
    return sorted(data.ids.tolist())[:n]
