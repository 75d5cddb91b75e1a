"""Every CUDA launch on the tensors' own device, not on whichever card is current.

Kernels that take raw pointers (the fused Triton noise) launch on the *current* CUDA device, and a CUDA graph
captures on the current device's stream: with chains on cuda:1 while cuda:0 is current, they would read another
card's memory (an asynchronous illegal-address error). `on_device` makes the tensors' device current for the
launch; plain torch operations need no guard (they follow their tensors).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # of images, chains and the classifier
    amp: torch.dtype | None  # the EBM's autocast dtype in the chains (None: none)
    strict: bool  # on CUDA: TF32 off, deterministic cuDNN and torch algorithms (slower; CPU-comparable, repeatable)


# `precision` (attack, training) -> its arithmetic: one table, read by the configs and the code
PRECISIONS = {
    "float32": Precision(torch.float32, None, False),  # on CUDA: TF32 convolutions and matmuls
    "float32_strict": Precision(torch.float32, None, True),
    "float64": Precision(torch.float64, None, True),  # exact cross-checks (attacks only)
    "bf16": Precision(torch.float32, torch.bfloat16, False),  # the EBM under bf16 autocast, chains in float32
}


def set_arithmetic(device: torch.device | str, precision: str = "float32") -> Precision:
    """Set the process's CUDA arithmetic for `precision` where a job sets up its device (not at import); returns it.

    float32 and bf16: TF32 convolutions and matmuls, which the Langevin gradient tolerates (benchmarks/gpu_check.py
    measures the chain against strict float32 and the CPU). float32_strict and float64: TF32 off, cuDNN's
    deterministic algorithms, torch's deterministic algorithms where it has them: a CUDA run then repeats bit for
    bit and compares with the CPU to rounding. Nothing changes on the CPU, which is deterministic already."""
    p = PRECISIONS[precision]
    if torch.device(device).type == "cuda":
        if p.strict:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not p.strict
        torch.backends.cudnn.deterministic = p.strict
        if p.strict:
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(p.strict, warn_only=True)
    return p
