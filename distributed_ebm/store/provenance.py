"""Which settings wrote a result: every setting that changes results, flattened to dotted keys,
and its fingerprint (a hash). Attack record parts and training checkpoints carry both, so a rerun
into the same output with other settings fails before any work, naming the settings that differ.

Settings that cannot change a result are left out: where it runs (ray.*), tracking (mlflow.*), the
output, console and checkpoint cadence, and for the attack the batch and chunk sizes and the subset
(an image's record is keyed by (seed, image id) alone). Weight files count by content, not path.
"""
from __future__ import annotations

import hashlib
import json

from . import storage
from ..config import InputError

ATTACK_FREE = ("ray.", "mlflow.", "output", "batch_size", "chunk_size", "data.count", "data.indices", "data.random",
               "data.subset_seed", "data.exclude", "data.download")
TRAIN_FREE = ("ray.", "mlflow.", "output", "name", "iterations", "checkpoint_every", "log_every", "data.download")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _content(url: str | None):
    return None if url is None else "sha256:" + hashlib.sha256(storage.read_bytes(url)).hexdigest()[:16]


def _keep(flat: dict, free: tuple[str, ...]) -> dict:
    return {k: v for k, v in sorted(flat.items()) if not any(k == f or (f.endswith(".") and k.startswith(f))
                                                              for f in free)}


def attack_settings(cfg) -> dict:
    flat = _flat(cfg.model_dump(mode="json"))
    flat["ebm"] = _content(cfg.ebm)
    flat["classifier.weights"] = _content(cfg.classifier.weights)
    return _keep(flat, ATTACK_FREE)


def train_settings(cfg) -> dict:
    return _keep(_flat(cfg.model_dump(mode="json")), TRAIN_FREE)


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check(stored: dict, current: dict, where: str) -> None:
    """Raise one line naming every setting in which `stored` (what wrote `where`) differs from `current`."""
    if fingerprint(stored) == fingerprint(current):
        return
    keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    diff = ", ".join(f"{k} ({stored.get(k)!r} there, {current.get(k)!r} now)" for k in keys)
    raise InputError(f"{where} was written with other settings: {diff}; use another output or the same settings")
