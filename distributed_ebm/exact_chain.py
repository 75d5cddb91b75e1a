"""Exact gradients through the Langevin purifier, with memory bounded by segment checkpointing.

The chain x_{t+1} = x_t - s * grad f(x_t) + sigma * xi_t has Jacobian I - s * Hess f(x_t) per step,
so back-propagating through it needs Hessian-vector products of the EBM. The noise xi_t is the
chain's keyed noise, so it is the same in the forward pass and in the recomputation.

The forward pass runs the chain without a graph and keeps only the states at segment boundaries.
The backward pass walks the segments in reverse: it rebuilds one segment's graph from its stored
start (each step's input gradient built with create_graph=True), back-propagates the incoming
vector through it, and frees it. Memory is therefore about steps / segment chain states plus one
segment's graph: with segment ~ sqrt(steps), it grows with sqrt(steps), not with steps.

(torch.utils.checkpoint does not fit here: every inner autograd.grad of a step unpacks the
segment's saved tensors and triggers a recomputation, so memory and time grow with
steps * segment; measured 8x slower and 4x more memory than the unrolled chain at K = 64.)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .langevin import frozen
from .noise import ChainKeys


def _steps(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, start: int, count: int,
           step_size: float, noise: float, create_graph: bool) -> torch.Tensor:
    """`count` Langevin steps from step number `start`; with create_graph the result is differentiable in x."""
    n, c, h, w = x.shape
    for t in range(start, start + count):
        if step_size:
            with torch.enable_grad():
                xg = x if create_graph else x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(energy(xg).sum(), xg, create_graph=create_graph)
            x = x - step_size * g
        if noise:
            x = x + noise * keys.normal(t, (h, w, c), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2)
    return x


class _CheckpointedChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, energy, keys, steps, step_size, noise, segment):
        starts, boundaries = list(range(0, steps, segment)), []
        for start in starts:
            boundaries.append(x)
            x = _steps(energy, x, keys, start, min(segment, steps - start), step_size, noise, create_graph=False)
        ctx.save_for_backward(*boundaries)
        ctx.setup = (energy, keys, steps, step_size, noise, segment, starts)
        return x

    @staticmethod
    def backward(ctx, grad_out):
        energy, keys, steps, step_size, noise, segment, starts = ctx.setup
        v = grad_out
        for start, x0 in zip(reversed(starts), reversed(ctx.saved_tensors)):
            with torch.enable_grad(), frozen(energy):
                x0 = x0.detach().requires_grad_(True)
                x1 = _steps(energy, x0, keys, start, min(segment, steps - start), step_size, noise, create_graph=True)
                (v,) = torch.autograd.grad(x1, x0, v)
        return v, None, None, None, None, None, None


def default_segment(steps: int) -> int:
    """round(sqrt(steps)): the segment length that balances stored states against one segment's graph."""
    return max(1, round(math.sqrt(steps)))


def differentiable_langevin(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, steps: int, step_size: float = 1.0,
                            noise: float = 0.01, segment: int | None = None) -> torch.Tensor:
    """The purifier's chain from x, differentiable with respect to x (not to the EBM's parameters).

    segment: Langevin steps per checkpointed segment; None = `default_segment(steps)`;
    segment >= steps keeps the whole graph (plain autograd through the unrolled chain).
    """
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} chain keys for {x.shape[0]} chains")
    keys = keys.to(x.device)  # once: no host-to-device copy per step
    segment = default_segment(steps) if segment is None else segment
    if segment < 1:
        raise ValueError(f"segment must be at least 1 (got {segment})")
    with frozen(energy):
        if segment >= steps:
            with torch.enable_grad():
                x = x if x.requires_grad else x.detach().requires_grad_(True)
                return _steps(energy, x, keys, 0, steps, step_size, noise, create_graph=True)
        return _CheckpointedChain.apply(x, energy, keys, steps, step_size, noise, segment)
