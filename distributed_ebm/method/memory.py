"""Peak memory of a piece of work, from the allocator's own books.

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`). CPU: PyTorch's CPU
allocator reports every allocation with its running total to the profiler when memory profiling
is on; the peak is the largest running total seen. Both are bytes above what was allocated
when the work started, so they measure the work, not the process.
"""
from __future__ import annotations

from typing import Callable

import torch


def auto_chunk_size(purifier, classifier, image_shape, device, dtype=torch.float32, probe: int = 32,
                    share: float = 0.4, default: int = 1024) -> int:
    """Most chains per forward pass: `default` off CUDA; on CUDA as many as fit `share` of the free
    memory, from the measured footprint of `probe` chains (two Langevin steps plus the classifier).

    `share` is under one half because the captured chain's memory pool and the classifier's
    eager forward do not share memory (the measured peak covers the larger of the two).
    """
    device = torch.device(device)
    if device.type != "cuda" or purifier is None:
        return default
    from .langevin import langevin
    from .noise import ChainKeys

    x = torch.zeros(probe, *image_shape, device=device, dtype=dtype)
    keys = ChainKeys.replicated(0, torch.arange(probe), 1)

    def work():
        with torch.no_grad():
            classifier(langevin(purifier.ebm, x, keys, 2, purifier.step_size, purifier.noise,
                                amp=purifier.amp, graph=False))

    per_chain = max(1, peak_allocated_bytes(work, device)) / probe
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(10_000_000, int(share * free / per_chain)))


def peak_allocated_bytes(work: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Run `work()` and return the peak of tensor memory it allocated on `device`, in bytes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu or cuda devices (got {device})")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    totals: list[int] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            totals.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
        stack.extend(node.children)
    if not totals:
        return 0
    totals.sort()
    _, first_total, first_size = totals[0]
    base = first_total - first_size  # allocated just before the first recorded allocation
    return max(total for _, total, _ in totals) - base
