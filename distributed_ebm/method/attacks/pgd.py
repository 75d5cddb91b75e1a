"""PGD geometry in [-1, 1] pixels: random start, ascent step, projection (L-inf and L2).

Budgets arrive in [0, 1] pixel units (as papers quote them) and are doubled here, once, by
`to_signed_units`; everything else works on [-1, 1] images.
"""
from __future__ import annotations

import torch

from ..noise import CALL_RANDOM_START, ChainKeys

NORMS = ("linf", "l2")


def to_signed_units(value: float) -> float:
    """A length in [0, 1] pixel units -> the same length for images in [-1, 1]."""
    return 2.0 * value


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


def project(x: torch.Tensor, x_nat: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Nearest point to x in the eps-ball around x_nat, then inside the valid pixel box [-1, 1]."""
    delta = x - x_nat
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    else:
        raise ValueError(f"norm must be one of {NORMS} (got {norm!r})")
    return (x_nat + delta).clamp(-1.0, 1.0)


def ascent_step(x: torch.Tensor, grad: torch.Tensor, norm: str, step_size: float) -> torch.Tensor:
    """Steepest ascent under the norm: sign(g) for L-inf, g / ||g|| for L2."""
    if norm == "linf":
        return x + step_size * grad.sign()
    return x + step_size * grad / _flat_norm(grad)


def random_start(x_nat: torch.Tensor, ids: torch.Tensor, seed: int, norm: str, eps: float) -> torch.Tensor:
    """A uniform point of the eps-ball around each image (keyed by image id), projected to valid pixels."""
    keys = ChainKeys(seed, torch.as_tensor(ids), torch.zeros(len(ids), dtype=torch.int64), CALL_RANDOM_START)
    shape = tuple(x_nat.shape[1:])
    if norm == "linf":
        delta = (2 * keys.uniform(0, shape, x_nat.device, x_nat.dtype) - 1) * eps
    else:
        direction = keys.normal(0, shape, x_nat.device, x_nat.dtype)
        radius = keys.uniform(1, (1,), x_nat.device, x_nat.dtype).pow(1.0 / direction[0].numel())
        delta = direction / _flat_norm(direction) * (eps * radius.view(-1, *([1] * len(shape))))
    return project(x_nat + delta, x_nat, norm, eps)
