"""The paper's EBM: five convolutions, LeakyReLU(0.05), no normalization, one energy per image."""
from __future__ import annotations

import torch
from torch import nn

from .. import storage
from ..config import InputError


class EBM(nn.Module):
    """f(x) -> energy, shape (N,). Low energy = realistic image.

    conv3x3(c->w) , conv4x4 s2 (w->2w), (2w->4w), (4w->8w), conv (8w->1) over the remaining
    image_size/8 pixels; LeakyReLU(0.05) after all but the last. width=32 at 32x32 is the
    paper's network: 693,569 parameters.
    """

    def __init__(self, width: int = 32, image_size: int = 32, channels: int = 3, slope: float = 0.05):
        super().__init__()
        if image_size % 8 or image_size < 8:
            raise ValueError(f"ebm.image_size must be a multiple of 8 (got {image_size})")
        self.width, self.image_size, self.channels = width, image_size, channels
        w = width
        act = lambda: nn.LeakyReLU(slope)  # noqa: E731
        self.net = nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), act(),
            nn.Conv2d(w, 2 * w, 4, 2, 1), act(),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), act(),
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1), act(),
            nn.Conv2d(8 * w, 1, image_size // 8, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()

    def spec(self) -> dict:
        return {"width": self.width, "image_size": self.image_size, "channels": self.channels}


def save_ebm(ebm: EBM, url: str, **extra) -> None:
    storage.save_torch({"kind": "ebm", **ebm.spec(), "state_dict": ebm.state_dict(), **extra}, url)


def load_ebm(url: str, image_size: int | None = None, map_location="cpu") -> EBM:
    """Rebuild an EBM from its checkpoint; `image_size` checks it fits the data it will see."""
    ckpt = storage.load_torch(url, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "ebm":
        raise InputError(f"{url} is not an EBM checkpoint (no kind='ebm' entry)")
    if image_size is not None and ckpt["image_size"] != image_size:
        raise InputError(f"EBM checkpoint {url} is for {ckpt['image_size']}x{ckpt['image_size']} images, "
                         f"the data are {image_size}x{image_size}")
    ebm = EBM(ckpt["width"], ckpt["image_size"], ckpt["channels"])
    ebm.load_state_dict(ckpt["state_dict"])
    return ebm.eval()
