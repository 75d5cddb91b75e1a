"""Exact gradients through the Langevin purifier, with memory bounded by segment checkpointing.

The chain x_{t+1} = x_t - s * grad f(x_t) + sigma * xi_t has Jacobian I - s * Hess f(x_t) per step,
so back-propagating through it needs Hessian-vector products of the EBM. The noise xi_t is the
chain's keyed noise, so it is the same in the forward pass and in the recomputation.

The forward pass runs the chain without a graph and keeps only the states at segment boundaries.
The backward pass walks the segments in reverse: it rebuilds one segment's graph from its stored
start (each step's input gradient built with create_graph=True), back-propagates the incoming
vector through it, and frees it. Memory is therefore about steps / segment chain states plus one
segment's graph: with segment ~ sqrt(steps), it grows with sqrt(steps), not with steps.

The gradient is that of the chain that is judged. The forward pass is the purifier's own sampler
(`langevin`: its layout, its CUDA graph, its autocast), and the recomputation repeats its arithmetic
op for op (channels-last states, the same fused subtract and add, the same autocast), so it rebuilds
the same states bit for bit. Two comparisons tie the differentiated chain to the judged one: the forward
pass's last state with the judged chain's (`judged`, the purified images the defense classified), and every
recomputed segment with the state the forward pass stored. A difference (TF32 or kernels that are not
deterministic on a device) fails the gradient with one line (`ChainMismatch`) instead of differentiating
another chain.

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

from .langevin import _autocast, frozen, langevin
from .noise import ChainKeys


class ChainMismatch(RuntimeError):
    """The recomputed chain is not the judged chain: its gradient would belong to another chain."""


def _grad(energy: nn.Module, x: torch.Tensor, create_graph: bool, amp) -> torch.Tensor:
    """`langevin.energy_grad`'s gradient; with create_graph, differentiable in x."""
    with torch.enable_grad():
        xg = x if create_graph else x.detach().requires_grad_(True)
        with _autocast(x.device, amp):
            f = energy(xg).sum()
        return torch.autograd.grad(f, xg, create_graph=create_graph)[0]


def _steps(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, start: int, count: int, step_size: float,
           noise: float, amp=None, surrogate: nn.Module | None = None) -> torch.Tensor:
    """`count` differentiable Langevin steps from step number `start`, in `langevin._step`'s arithmetic (out of
    place); through `surrogate`'s Hessian instead of the energy's when given (the values stay the exact chain's)."""
    n, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    for t in range(start, start + count):
        if step_size and surrogate is not None:
            g_sur = _grad(surrogate, x, True, amp)
            x = torch.sub(x, _grad(energy, x, False, amp), alpha=step_size) - step_size * (g_sur - g_sur.detach())
        elif step_size:
            x = torch.sub(x, _grad(energy, x, True, amp), alpha=step_size)
        if noise:
            x = torch.add(x, keys.normal(t, (h, w, c), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2), alpha=noise)
    return x


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def chain_digest(states: torch.Tensor) -> torch.Tensor:
    """Per chain, two int64 sums of its bit patterns (plain and position-weighted): equal states give equal digests,
    and a chain that differs in any one bit of one value gives another. What the exact gradient keeps of the judged
    chains between its two passes, so that its memory stays bounded by `chunk_size` chains."""
    bits = states.detach().contiguous().view(_BITS[states.element_size()]).flatten(1).long()
    weights = torch.arange(bits.shape[1], device=bits.device) % 65521 + 1
    return torch.stack([bits.sum(1), (bits * weights).sum(1)], 1)


class _CheckpointedChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, energy, keys, steps, step_size, noise, segment, surrogate, amp, judged):
        starts = list(range(0, steps, segment))
        boundaries = [x.detach().contiguous(memory_format=torch.channels_last)]
        for start in starts:  # the purifier's sampler, segment by segment (the same chain as in one piece)
            boundaries.append(langevin(energy, boundaries[-1], keys, min(segment, steps - start), step_size, noise,
                                       start_step=start, amp=amp))
        if judged is not None and not torch.equal(chain_digest(boundaries[-1]), judged):
            chains = int((chain_digest(boundaries[-1]) != judged).any(1).sum())
            raise ChainMismatch(f"exact gradient: the differentiated chain is not the judged one after {steps} steps "
                                f"({chains} of {len(judged)} chains differ); this device's kernels do not repeat bit "
                                "for bit, so the gradient would be another chain's")
        ctx.save_for_backward(*boundaries)
        ctx.setup = (energy, keys, steps, step_size, noise, segment, starts, surrogate, amp)
        return boundaries[-1].clone()

    @staticmethod
    def backward(ctx, grad_out):
        energy, keys, steps, step_size, noise, segment, starts, surrogate, amp = ctx.setup
        states, v = ctx.saved_tensors, grad_out
        for k in reversed(range(len(starts))):
            start, count = starts[k], min(segment, steps - starts[k])
            with torch.enable_grad(), frozen(energy):
                x0 = states[k].detach().requires_grad_(True)
                x1 = _steps(energy, x0, keys, start, count, step_size, noise, amp, surrogate)
                if not torch.equal(x1.detach(), states[k + 1]):
                    diff = (x1.detach() - states[k + 1]).abs().max().item()
                    raise ChainMismatch(f"exact gradient: the recomputed chain left the judged one in steps "
                                        f"{start}..{start + count - 1} (max |difference| {diff:.3g}); this device's "
                                        "kernels do not repeat bit for bit, so the gradient would be another chain's")
                (v,) = torch.autograd.grad(x1, x0, v)
        return v, None, None, None, None, None, None, None, None, None


def default_segment(steps: int) -> int:
    """round(sqrt(steps)): the segment length that balances stored states against one segment's graph."""
    return max(1, round(math.sqrt(steps)))


def differentiable_langevin(energy: nn.Module, x: torch.Tensor, keys: ChainKeys, steps: int, step_size: float = 1.0,
                            noise: float = 0.01, segment: int | None = None,
                            surrogate: nn.Module | None = None, amp: torch.dtype | None = None,
                            judged: torch.Tensor | None = None) -> torch.Tensor:
    """The purifier's chain from x (`langevin`'s states, bit for bit), differentiable with respect to x
    (not to the EBM's parameters).

    segment: Langevin steps per checkpointed segment; None = `default_segment(steps)`; segment >= steps
    recomputes the whole chain in one graph. surrogate: an energy whose Hessian replaces the energy's in the
    backward pass (module docstring); None = the exact pathwise gradient. amp: the purifier's autocast dtype.
    judged: `chain_digest` of the chains' final states as the judged pass produced them; the forward pass must equal
    them bit for bit (else `ChainMismatch`). None = no judged pass to compare with.
    """
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} chain keys for {x.shape[0]} chains")
    keys = keys.to(x.device)  # once: no host-to-device copy per step
    segment = default_segment(steps) if segment is None else segment
    if segment < 1:
        raise ValueError(f"segment must be at least 1 (got {segment})")
    with frozen(energy):
        return _CheckpointedChain.apply(x, energy, keys, steps, step_size, noise, min(segment, max(steps, 1)),
                                        surrogate, amp, None if judged is None else judged.detach())
