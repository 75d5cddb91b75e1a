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


def finite_or_refuse(state: dict, url: str) -> None:
    """Weights with NaN or inf give meaningless results (natural accuracy 0 reported as a finding)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"checkpoint {url}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}): "
                         "the model diverged or the file is damaged")


def load_ebm(url: str, image_size: int | None = None, map_location="cpu", channels: int | None = None) -> EBM:
    """Rebuild an EBM from its checkpoint; `image_size` and `channels` check it fits the data it will see."""
    ckpt = storage.load_torch(url, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "ebm":
        raise InputError(f"{url} is not an EBM checkpoint (no kind='ebm' entry)")
    lacking = [k for k in ("width", "image_size", "channels", "state_dict") if k not in ckpt]
    if lacking or not isinstance(ckpt["state_dict"], dict) \
            or not all(isinstance(ckpt[k], int) and ckpt[k] >= 1 for k in ("width", "image_size", "channels")):
        raise InputError(f"EBM checkpoint {url} lacks {', '.join(lacking) or 'valid sizes'}: "
                         "expected width, image_size, channels (integers) and state_dict")
    if image_size is not None and ckpt["image_size"] != image_size:
        raise InputError(f"EBM checkpoint {url} is for {ckpt['image_size']}x{ckpt['image_size']} images, "
                         f"the data are {image_size}x{image_size}")
    if channels is not None and ckpt["channels"] != channels:
        raise InputError(f"EBM checkpoint {url} is for {ckpt['channels']}-channel images, the data have {channels}")
    try:
        ebm = EBM(ckpt["width"], ckpt["image_size"], ckpt["channels"])
        ebm.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0].rstrip(":")
        raise InputError(f"EBM checkpoint {url}: its tensors do not fit an EBM of width {ckpt['width']}, "
                         f"image_size {ckpt['image_size']}, channels {ckpt['channels']} ({first})") from None
    finite_or_refuse(ckpt["state_dict"], url)
    return ebm.eval()
