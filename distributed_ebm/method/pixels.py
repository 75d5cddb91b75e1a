"""The pixel convention of the method: images live in [-1, 1] (x = 2 p - 1 for p in [0, 1], as in the paper)."""
from __future__ import annotations

import torch


def unit_range(pixels: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 pixels p (any layout) -> float32 x = 2 p / 255 - 1, made on `device` (the uint8 travel there).
    Float input is taken as already in [-1, 1]."""
    if device is not None:
        pixels = pixels.to(device)
    return pixels.float().div_(127.5).sub_(1.0) if pixels.dtype == torch.uint8 else pixels
