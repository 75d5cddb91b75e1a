"""Exact gradients through the Langevin purifier, with memory bounded by gradient checkpointing.

The chain x_{t+1} = x_t - s * grad f(x_t) + sigma * xi_t has Jacobian I - s * Hess f(x_t) per step,
so back-propagating through it needs Hessian-vector products of the EBM: the forward pass builds
each step's input gradient with `create_graph=True`. The noise xi_t is the chain's keyed noise,
so it is the same in the forward pass and in the recomputation. Only the chain state at segment
boundaries is kept; a segment's graph is rebuilt during the backward pass (torch.utils.checkpoint),
so memory grows with the segment length plus the number of segments (about 2 sqrt(K) states at the
best segment length sqrt(K)), not with K.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..langevin import frozen
from ..noise import ChainKeys


def _steps(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, start: int, count: int,
           step_size: float, noise: float) -> torch.Tensor:
    """`count` differentiable Langevin steps from step number `start` (graph kept through the gradients)."""
    n, c, h, w = x.shape
    for t in range(start, start + count):
        if step_size:
            (g,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
            x = x - step_size * g
        if noise:
            x = x + noise * keys.normal(t, (h, w, c), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2)
    return x


def differentiable_langevin(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, steps: int, step_size: float = 1.0,
                            noise: float = 0.01, segment: int | None = None) -> torch.Tensor:
    """The purifier's chain from x, differentiable with respect to x (not to the EBM's parameters).

    segment: Langevin steps per checkpointed segment; None = round(sqrt(steps)), the memory optimum;
    segment >= steps keeps the whole graph (plain autograd through the unrolled chain).
    """
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} chain keys for {x.shape[0]} chains")
    segment = max(1, round(math.sqrt(steps))) if segment is None else segment
    if segment < 1:
        raise ValueError(f"segment must be at least 1 (got {segment})")
    with frozen(energy), torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        for start in range(0, steps, segment):
            count = min(segment, steps - start)
            if count == steps:  # one segment: nothing to recompute
                x = _steps(energy, x, keys, start, count, step_size, noise)
            else:
                x = checkpoint(_steps, energy, x, keys, start, count, step_size, noise, use_reentrant=False)
    return x
