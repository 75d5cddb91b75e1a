"""The pixel convention of the method: images live in [-1, 1] (x = 2 p - 1 for p in [0, 1], as in the paper).

The one home of the conversion, both ways: uint8 pixels p <-> float32 x = 2 p / 255 - 1, in any layout
(`unit_range`, `uint8_pixels`), and between the decoders' N x H x W x C uint8 arrays and the method's
N x C x H x W tensors (`unit_range_hwc`, `uint8_hwc`). uint8 -> float -> uint8 gives back every pixel exactly.
"""
from __future__ import annotations

import numpy as np
import torch


def unit_range(pixels: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 pixels p (any layout) -> float32 x = 2 p / 255 - 1, made on `device` (the uint8 travel there).
    Float input is taken as already in [-1, 1]."""
    if device is not None:
        pixels = pixels.to(device)
    return pixels.float().div_(127.5).sub_(1.0) if pixels.dtype == torch.uint8 else pixels


def uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """The inverse of `unit_range` (any layout, on the CPU), clamped to [-1, 1] and rounded to the nearest
    pixel value (for pictures and transfers); uint8 input is returned as it is."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def unit_range_hwc(pixels_u8: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C pixels p -> float32 N x C x H x W images x = 2 p / 255 - 1."""
    return unit_range(torch.from_numpy(np.ascontiguousarray(pixels_u8)).permute(0, 3, 1, 2))


def uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """N x C x H x W images (uint8, or floats in [-1, 1]) -> uint8 N x H x W x C pixels: the inverse of
    `unit_range_hwc` (no copy for uint8 pixels that are channels-last in memory, as decoded)."""
    return np.ascontiguousarray(uint8_pixels(images).permute(0, 2, 3, 1).numpy())
