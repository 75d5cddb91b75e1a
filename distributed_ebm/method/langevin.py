"""Langevin dynamics, the hot loop: x <- x - s * grad f(x) + sigma * xi, over a batch of chains.

With U = f / (sigma^2 / 2) and s = 1 this is the unadjusted Langevin step targeting exp(-U).
No clamping to [-1, 1] (as the paper). Each chain's noise comes from its key (`ChainKeys`), so a
chain is the same whatever batch, chunk or worker runs it. Only the input gradient is computed:
the EBM's parameters are frozen for the duration, so no weight gradients are formed or stored.
Chains are kept channels-last (NHWC), the layout oneDNN and cuDNN convolve fastest (about 20%
faster than NCHW on this project's CPU benchmark); the noise is drawn in NHWC order, so results do
not depend on the layout.

On CUDA the fixed-shape loop is captured once as a CUDA graph (one step: input gradient, update,
fused keyed noise, step counter += 1, all on the device) and replayed `steps` times, so no
Python, launch overhead or host synchronisation remains in the loop. `amp=torch.bfloat16` runs
the EBM's forward and backward under bf16 autocast; the chain state stays in its own dtype.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict

import torch
from torch import nn

from .devices import on_device
from .noise import ChainKeys


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters stop requiring grad inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def prepare_energy(energy: nn.Module) -> nn.Module:
    """Put an EBM in the sampler's layout (in place; returns it)."""
    return energy.to(memory_format=torch.channels_last)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp, cache_enabled=False) if amp else contextlib.nullcontext()


def energy_grad(energy: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
    """d sum(f(x)) / dx; each chain's gradient is its own (f has no batch coupling).

    amp: run f and its backward under autocast to this dtype; the gradient keeps x's dtype.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with _autocast(x.device, amp):
            f = energy(x).sum()
        return torch.autograd.grad(f, x)[0]


def _step(energy, x, keys, t, step_size, noise, amp, use_grad) -> None:
    """One Langevin step in place; `t` is the step number (an int, or a 0-d device tensor)."""
    n, c, h, w = x.shape
    if use_grad:
        x.sub_(energy_grad(energy, x, amp), alpha=step_size)
    if noise:
        x.add_(keys.normal(t, (h, w, c), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2), alpha=noise)


GRAPH_MIN_STEPS = 8  # shorter chains run eagerly: capturing costs about 4 eager steps
GRAPHS_WORK = True  # False after a capture failed in this process (then every chain runs eagerly)


def _graph_failed(exc: Exception) -> None:
    global GRAPHS_WORK
    GRAPHS_WORK = False
    warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running the Langevin loop eagerly")


def langevin(energy: nn.Module | None, x: torch.Tensor, keys: ChainKeys, steps: int,
             step_size: float = 1.0, noise: float = 0.01, start_step: int = 0,
             amp: torch.dtype | None = None, graph: bool | None = None) -> torch.Tensor:
    """Run `steps` Langevin steps from `x` (N x C x H x W), one chain per row of `keys`.

    step_size = 0 (or energy None) gives the noise-only control chain. Returns a new tensor
    without autograd history. `start_step` continues the same chain's noise sequence. amp: the
    EBM's autocast dtype (None = x's dtype). graph: replay a captured CUDA graph (None = on CUDA
    for chains of at least GRAPH_MIN_STEPS steps).
    """
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} chain keys for {x.shape[0]} chains")
    x = x.detach().clone(memory_format=torch.channels_last)
    keys = keys.to(x.device)  # once per chain: the loop copies nothing between host and device
    use_grad = energy is not None and step_size != 0
    if graph is None:
        graph = x.device.type == "cuda" and steps >= GRAPH_MIN_STEPS and x.shape[0] > 0
    if graph and GRAPHS_WORK:
        with on_device(x.device):  # a graph captures and replays on the current device's stream: the chains'
            try:
                runner = _graphed(energy if use_grad else None, x.shape, x.dtype, x.device, keys.seed, step_size,
                                  noise, amp)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # capture unsupported here: the eager loop gives the same chain
                _graph_failed(exc)
            else:
                return runner.run(x, keys, start_step, steps)
    with frozen(energy) if use_grad else contextlib.nullcontext():
        for t in range(start_step, start_step + steps):
            _step(energy, x, keys, t, step_size, noise, amp, use_grad)
    return x


class _GraphedStep:
    """One captured Langevin step on static buffers (chains, keys, step counter) for one shape.

    Every tensor the step reads or writes lives in a buffer allocated outside the capture, so
    graphs of different shapes can share one memory pool (they replay one at a time, in order).
    """

    def __init__(self, energy, shape, dtype, device, seed, step_size, noise, amp):
        n = shape[0]
        self.x = torch.zeros(shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.reps = torch.zeros(n, dtype=torch.int64, device=device)
        self.call = torch.zeros(n, dtype=torch.int64, device=device)
        self.t = torch.zeros((), dtype=torch.int64, device=device)
        self.energy = energy
        keys = ChainKeys(seed, self.ids, self.reps, self.call)
        use_grad = energy is not None

        def step():
            _step(energy, self.x, keys, self.t, step_size, noise, amp, use_grad)
            self.t.add_(1)

        with frozen(energy) if use_grad else contextlib.nullcontext():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: compiles the kernel, picks cuDNN algorithms
                for _ in range(3):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=_pool(device)):
                step()

    def run(self, x, keys: ChainKeys, start: int, steps: int) -> torch.Tensor:
        self.x.copy_(x)
        self.ids.copy_(keys.ids)
        self.reps.copy_(keys.replicas)
        if isinstance(keys.call, torch.Tensor):
            self.call.copy_(keys.call)
        else:
            self.call.fill_(keys.call)
        self.t.fill_(start)
        for _ in range(steps):
            self.graph.replay()
        return self.x.clone()


_GRAPHS: "OrderedDict[tuple, _GraphedStep]" = OrderedDict()
_POOLS: dict = {}
GRAPH_CACHE = 4  # shapes kept captured (a run has a few: full chunks, the last chunk, shrinking batches)


def _pool(device):
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def _graphed(energy, shape, dtype, device, seed, step_size, noise, amp) -> _GraphedStep:
    """The captured step for this configuration (captured on first use; least recently used dropped)."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # baked in at capture
    key = (id(energy), tuple(shape), dtype, device, seed, step_size, noise, amp, tf32)
    hit = _GRAPHS.get(key)
    if hit is not None and (energy is None or hit.energy is energy):
        _GRAPHS.move_to_end(key)
        return hit
    _GRAPHS[key] = g = _GraphedStep(energy, shape, dtype, device, seed, step_size, noise, amp)
    while len(_GRAPHS) > GRAPH_CACHE:
        _GRAPHS.popitem(last=False)
    return g
