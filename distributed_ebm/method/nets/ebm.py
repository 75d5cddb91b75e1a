"""The paper's EBM: five convolutions, an activation (LeakyReLU(0.05) in the paper), one energy per image."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError

LRELU_SLOPE = 0.05  # the paper's
SOFT_ALPHA, SOFT_EPS = 0.49, 0.01  # MEFA's


class SoftLeakyReLU(nn.Module):
    """MEFA's smooth LeakyReLU: (1 - a) x + a sqrt(x^2 + e^2) - a e; slope 1 on the right, 1 - 2a on
    the left, curvature a e^2 / (x^2 + e^2)^(3/2) (a = 0.49, e = 0.01: slopes 1 and 0.02)."""

    def __init__(self, alpha: float = SOFT_ALPHA, eps: float = SOFT_EPS):
        super().__init__()
        self.alpha, self.eps = alpha, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, e = self.alpha, self.eps
        return (1 - a) * x + a * torch.sqrt(x * x + e * e) - a * e

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, eps={self.eps}"


class SoftplusLeakyReLU(nn.Module):
    """b x + (1 - b) T softplus(x / T): a smooth stand-in for LeakyReLU(b) that tends to it as T -> 0
    (its second derivative is (1 - b) sigmoid'(x / T) / T, a bump of width ~T at the kink)."""

    def __init__(self, slope: float, temperature: float):
        super().__init__()
        self.slope, self.temperature = slope, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return self.slope * x + (1 - self.slope) * t * F.softplus(x / t)

    def extra_repr(self) -> str:
        return f"slope={self.slope}, temperature={self.temperature}"


class SiLU(nn.Module):
    """x sigmoid(x), written out: torch's fused SiLU differentiates by another formula when the graph is kept
    (create_graph), so the exact gradient's recomputation would not repeat the sampler's chain bit for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


# ebm.activation -> the module after each conv but the last, from (soft_alpha, soft_eps): one line per activation
ACTIVATIONS = {
    "lrelu": lambda alpha, eps: nn.LeakyReLU(LRELU_SLOPE),
    "soft_lrelu": SoftLeakyReLU,
    "silu": lambda alpha, eps: SiLU(),
}


def _activation(name: str, soft_alpha: float, soft_eps: float) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"ebm.activation must be one of {', '.join(ACTIVATIONS)} (got {name!r})")
    return ACTIVATIONS[name](soft_alpha, soft_eps)


class _Energy(nn.Module):
    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


class EBM(_Energy):
    """f(x) -> energy, shape (N,). Low energy = realistic image.

    conv3x3(c->w) , conv4x4 s2 (w->2w), (2w->4w), (4w->8w), conv (8w->1) over the remaining
    image_size/8 pixels; the activation after all but the last: `lrelu` (the paper's
    LeakyReLU(0.05), piecewise linear), `soft_lrelu` (MEFA's smooth version, constants
    soft_alpha, soft_eps) or `silu`. width=32 at 32x32 is the paper's network: 693,569 parameters.
    """

    def __init__(self, width: int = 32, image_size: int = 32, channels: int = 3, activation: str = "lrelu",
                 soft_alpha: float = SOFT_ALPHA, soft_eps: float = SOFT_EPS):
        if image_size % 8 or image_size < 8:
            raise ValueError(f"ebm.image_size must be a multiple of 8 (got {image_size})")
        w = width
        act = lambda: _activation(activation, soft_alpha, soft_eps)  # noqa: E731
        super().__init__(nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), act(),
            nn.Conv2d(w, 2 * w, 4, 2, 1), act(),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), act(),
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1), act(),
            nn.Conv2d(8 * w, 1, image_size // 8, 1, 0),
        ))
        self.width, self.image_size, self.channels = width, image_size, channels
        self.activation, self.soft_alpha, self.soft_eps = activation, soft_alpha, soft_eps

    def spec(self) -> dict:
        return {"width": self.width, "image_size": self.image_size, "channels": self.channels,
                "activation": self.activation_spec()}

    def activation_spec(self) -> dict:
        """The activation and its constants, as recorded in checkpoints."""
        if self.activation == "lrelu":
            return {"name": "lrelu", "slope": LRELU_SLOPE}
        if self.activation == "soft_lrelu":
            return {"name": "soft_lrelu", "alpha": self.soft_alpha, "eps": self.soft_eps}
        return {"name": self.activation}

    @property
    def piecewise_linear(self) -> bool:
        """Hessian zero almost everywhere (LeakyReLU): what `smooth_surrogate` stands in for."""
        return self.activation == "lrelu"

    def smooth_surrogate(self, temperature: float) -> nn.Module | None:
        """The same network (parameters shared) with each LeakyReLU(b) replaced by
        b x + (1 - b) T softplus(x / T); None when the activation is already smooth."""
        if not self.piecewise_linear:
            return None
        layers = [SoftplusLeakyReLU(m.negative_slope, temperature) if isinstance(m, nn.LeakyReLU) else m
                  for m in self.net]
        return _Energy(nn.Sequential(*layers))


def ebm_checkpoint(ebm: EBM, **extra) -> dict:
    """What an EBM checkpoint holds: its network (`spec`), its weights and any `extra` entries."""
    return {"kind": "ebm", **ebm.spec(), "state_dict": ebm.state_dict(), **extra}


def finite_or_refuse(state: dict, url: str) -> None:
    """Weights with NaN or inf give meaningless results (natural accuracy 0 reported as a finding)."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"checkpoint {url}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}): "
                         "the model diverged or the file is damaged")


def _describe(spec: dict) -> str:
    constants = ", ".join(f"{k}={v:g}" for k, v in spec.items() if k != "name")
    return f"{spec['name']} ({constants})" if constants else spec["name"]


def check_activation(url: str, recorded: dict, activation: str, soft_alpha: float = SOFT_ALPHA,
                     soft_eps: float = SOFT_EPS) -> None:
    """Fail with one line naming both when a config asks for another activation than the checkpoint's."""
    wanted = EBM(1, 8, 1, activation, soft_alpha, soft_eps).activation_spec()
    if wanted != recorded:
        raise InputError(f"EBM checkpoint {url} has activation {_describe(recorded)}, "
                         f"the config asks for {_describe(wanted)}")


def ebm_from_checkpoint(ckpt, url: str, image_size: int | None = None, channels: int | None = None,
                        activation: str | None = None, soft_alpha: float = SOFT_ALPHA,
                        soft_eps: float = SOFT_EPS) -> EBM:
    """Rebuild an EBM from its checkpoint `ckpt` (read from `url`, which messages name); `image_size` and
    `channels` check it fits the data it will see and `activation` (with its constants), when given, that it
    is the one the checkpoint was trained with.
    A checkpoint that records no activation is the paper's LeakyReLU(0.05)."""
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
    recorded = ckpt.get("activation", {"name": "lrelu", "slope": LRELU_SLOPE})
    if not isinstance(recorded, dict) or not isinstance(recorded.get("name"), str):
        raise InputError(f"EBM checkpoint {url}: its activation record {recorded!r} is not of the form "
                         "{'name': ..., constants}")
    if activation is not None:
        check_activation(url, recorded, activation, soft_alpha, soft_eps)
    if recorded["name"] not in ACTIVATIONS or (recorded["name"] == "lrelu" and recorded.get("slope") != LRELU_SLOPE):
        raise InputError(f"EBM checkpoint {url} has activation {_describe(recorded)}; "
                         f"this version knows {', '.join(ACTIVATIONS)} (lrelu with slope {LRELU_SLOPE})")
    try:
        ebm = EBM(ckpt["width"], ckpt["image_size"], ckpt["channels"], recorded["name"],
                  recorded.get("alpha", SOFT_ALPHA), recorded.get("eps", SOFT_EPS))
        ebm.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0].rstrip(":")
        raise InputError(f"EBM checkpoint {url}: its tensors do not fit an EBM of width {ckpt['width']}, "
                         f"image_size {ckpt['image_size']}, channels {ckpt['channels']} ({first})") from None
    finite_or_refuse(ckpt["state_dict"], url)
    return ebm.eval()
