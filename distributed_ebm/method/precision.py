"""The arithmetic of each `precision` (attack, training): one table, read by the configs and the code."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
