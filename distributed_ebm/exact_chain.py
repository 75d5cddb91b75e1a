"""Exact gradients through the Langevin purifier, with memory bounded by segment checkpointing.

The chain x_{t+1} = x_t - s * grad f(x_t) + sigma * xi_t has Jacobian I - s * Hess f(x_t) per step,
so back-propagating through it needs Hessian-vector products of the EBM. The noise xi_t is the
chain's keyed noise, so it is the same in the forward pass and in the recomputation.

The forward pass runs the chain without a graph and keeps only the states at segment boundaries.
The backward pass walks the segments in reverse: it rebuilds one segment's graph from its stored
start (each step's input gradient built with create_graph=True), back-propagates the incoming
vector through it, and frees it. Memory is therefore about steps / segment chain states plus one
segment's graph: with segment ~ sqrt(steps), it grows with sqrt(steps), not with steps.

Kink-aware gradients (`surrogate`): for a piecewise-linear EBM (the paper's LeakyReLU) Hess f is
zero almost everywhere, so the pathwise gradient equals BPDA's and misses how the noise smooths the
drift's jumps at the kinks. With a smooth stand-in f_T of f (`EBM.smooth_surrogate`), each step is
x_{t+1} = x_t - s * grad f(x_t) - s * (grad f_T(x_t) - stop_grad(grad f_T(x_t))) + sigma * xi_t:
its value is the exact step (the added term is exactly zero), its Jacobian is I - s * Hess f_T(x_t).
The result is the mixed quantity
    grad_x0 L = J_0^T ... J_{K-1}^T grad L(x_K),  J_t = I - s * Hess f_T(x_t),
with x_t the EXACT chain's states (drift grad f). It is not the gradient of any one chain: it
equals the smoothed chain's gradient (drift grad f_T throughout) only if its states were used, and
the pathwise exact gradient as T -> 0 (Hess f_T -> 0 away from the kinks).

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


def _grad(energy: nn.Module, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    with torch.enable_grad():
        xg = x if create_graph else x.detach().requires_grad_(True)
        return torch.autograd.grad(energy(xg).sum(), xg, create_graph=create_graph)[0]


def _steps(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, start: int, count: int,
           step_size: float, noise: float, create_graph: bool, surrogate: nn.Module | None = None) -> torch.Tensor:
    """`count` Langevin steps from step number `start`; with create_graph the result is differentiable in x
    (through `surrogate`'s Hessian instead of the energy's when given: the values stay the exact chain's)."""
    n, c, h, w = x.shape
    for t in range(start, start + count):
        if step_size and create_graph and surrogate is not None:
            g_sur = _grad(surrogate, x, create_graph=True)
            x = x - step_size * _grad(energy, x, create_graph=False) - step_size * (g_sur - g_sur.detach())
        elif step_size:
            x = x - step_size * _grad(energy, x, create_graph)
        if noise:
            x = x + noise * keys.normal(t, (h, w, c), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2)
    return x


class _CheckpointedChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, energy, keys, steps, step_size, noise, segment, surrogate):
        starts, boundaries = list(range(0, steps, segment)), []
        for start in starts:
            boundaries.append(x)
            x = _steps(energy, x, keys, start, min(segment, steps - start), step_size, noise, create_graph=False)
        ctx.save_for_backward(*boundaries)
        ctx.setup = (energy, keys, steps, step_size, noise, segment, starts, surrogate)
        return x

    @staticmethod
    def backward(ctx, grad_out):
        energy, keys, steps, step_size, noise, segment, starts, surrogate = ctx.setup
        v = grad_out
        for start, x0 in zip(reversed(starts), reversed(ctx.saved_tensors)):
            with torch.enable_grad(), frozen(energy):
                x0 = x0.detach().requires_grad_(True)
                x1 = _steps(energy, x0, keys, start, min(segment, steps - start), step_size, noise, True, surrogate)
                (v,) = torch.autograd.grad(x1, x0, v)
        return v, None, None, None, None, None, None, None


def default_segment(steps: int) -> int:
    """round(sqrt(steps)): the segment length that balances stored states against one segment's graph."""
    return max(1, round(math.sqrt(steps)))


def differentiable_langevin(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, steps: int, step_size: float = 1.0,
                            noise: float = 0.01, segment: int | None = None,
                            surrogate: nn.Module | None = None) -> torch.Tensor:
    """The purifier's chain from x, differentiable with respect to x (not to the EBM's parameters).

    segment: Langevin steps per checkpointed segment; None = `default_segment(steps)`;
    segment >= steps keeps the whole graph (plain autograd through the unrolled chain).
    surrogate: an energy whose Hessian replaces the energy's in the backward pass (module docstring);
    None = the exact pathwise gradient.
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
                return _steps(energy, x, keys, 0, steps, step_size, noise, True, surrogate)
        return _CheckpointedChain.apply(x, energy, keys, steps, step_size, noise, segment, surrogate)
