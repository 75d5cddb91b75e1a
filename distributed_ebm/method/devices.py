"""The device a job runs on, and every CUDA launch on the tensors' own device, not on whichever card is current.

Kernels that take raw pointers (the fused Triton noise) launch on the *current* CUDA device, and a CUDA graph
captures on the current device's stream: with chains on cuda:1 while cuda:0 is current, they would read another
card's memory (an asynchronous illegal-address error). `on_device` makes the tensors' device current for the
launch; plain torch operations need no guard (they follow their tensors).
"""
from __future__ import annotations

import contextlib

import torch


def on_device(device: torch.device | str):
    """A context in which `device` is the current CUDA device (nothing to do for another device type)."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)  # cuda (no index) keeps the current device


def job_device(name: str | None) -> torch.device:
    """A job's `--device` (None or "auto": CUDA where present), checked, and made the current CUDA device, so
    whatever still uses the current device (a library's kernel, a stream) runs on this one too."""
    from ..errors import InputError

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a torch device (auto, cuda, cuda:N, cpu)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        torch.cuda.set_device(device)
    return device
