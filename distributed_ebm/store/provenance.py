"""Which settings wrote a result: every setting that changes results, flattened to dotted keys,
and its fingerprint (a hash). Attack record parts carry both, so a rerun into the same output with other
settings fails before any work, naming the settings that differ (training checkpoints: checkpoints.py).

Settings that cannot change a result are left out: where it runs (ray.*), tracking (mlflow.*), the
output, the batch and chunk sizes and the subset (an image's record is keyed by (seed, image id) alone).
Weight files count by content, not path.
"""
from __future__ import annotations

import hashlib
import json

from ..errors import InputError
from . import storage

ATTACK_FREE = ("ray.", "mlflow.", "output", "batch_size", "chunk_size", "data.count", "data.indices", "data.random",
               "data.subset_seed", "data.exclude", "data.download", "report.gallery")
ADDED = {"report.gradient_check": 0,  # settings added since records were first written: their value before
         "purify.init_noise": 0.0, "ebm_format": "auto", "classifier.format": "auto"}


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested settings tree as dotted keys."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _content(url: str | None):
    return None if url is None else "sha256:" + hashlib.sha256(storage.read_bytes(url)).hexdigest()[:16]


def _keep(settings: dict, free: tuple[str, ...]) -> dict:
    return {k: v for k, v in sorted(settings.items()) if not any(k == f or (f.endswith(".") and k.startswith(f))
                                                              for f in free)}


def attack_settings(cfg) -> dict:
    settings = flat(cfg.model_dump(mode="json"))
    settings["ebm"] = _content(cfg.ebm)
    settings["classifier.weights"] = _content(cfg.classifier.weights)
    return _keep(settings, ATTACK_FREE)


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check(stored: dict, current: dict, where: str) -> None:
    """Raise one line naming every setting in which `stored` (what wrote `where`) differs from `current`."""
    stored = {**{k: v for k, v in ADDED.items() if k in current}, **stored}
    if fingerprint(stored) == fingerprint(current):
        return
    keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    diff = ", ".join(f"{k} ({stored.get(k)!r} there, {current.get(k)!r} now)" for k in keys)
    raise InputError(f"{where} was written with other settings: {diff}; use another output or the same settings")
