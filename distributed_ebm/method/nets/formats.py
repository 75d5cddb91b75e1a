"""Released checkpoints, each read as it is: the table of source formats and the networks they hold.

`FORMATS` is the one table: per format, how the file is read, which network it builds, its input
range, the purification its paper used (docs/models.md shows it through `format_table`) and its
builder; `build_network` reads a file's content as a format by one lookup and one call. The
networks are built from the state dict's own keys and shapes (the real 28-10 from a real file, a
narrow one from a narrow file); reading the bytes is the store's (store/released.py).

Two formats share their keys: the Stochastic Security EBM and MEFA's are both a bare state dict of
`f.0` ... `f.8`, with a LeakyReLU(0.05) or a smooth activation in between. Keys cannot tell them
apart, so `auto` refuses them and the user names the format (and MEFA's activation).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...errors import InputError
from .classifiers import HALF, Classifier, ReleasedWideResNet, classifier_from_checkpoint
from .ebm import (
    ACTIVATIONS,
    EBM,
    LRELU_SLOPE,
    SOFT_ALPHA,
    SOFT_EPS,
    check_activation,
    ebm_from_checkpoint,
    finite_or_refuse,
)


class JEMEnergy(nn.Module):
    """JEM (Grathwohl et al. 2020): a norm-free WRN trunk `f` with LeakyReLU(0.2), heads `energy_output` and
    `class_output`. The energy of an image is minus the log-sum-exp of `class_output`'s logits (their CCF
    model; `energy_output` and the trunk's own `linear` are in the file but unused)."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, channels: int = 3):
        super().__init__()
        self.f = ReleasedWideResNet(depth, widen, num_classes, norm=False, slope=0.2, channels=channels)
        width = self.f.linear.in_features
        self.energy_output = nn.Linear(width, 1)
        self.class_output = nn.Linear(width, num_classes)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(self.class_output(self.f.features(x)), dim=1)

    def spec(self) -> dict:
        return {"network": "jem_wrn", "depth": self.f.depth, "widen": self.f.widen,
                "num_classes": self.class_output.out_features, "channels": self.channels}


class JEMLogits(nn.Module):
    """JEM's classifier: the same trunk's `class_output` logits (JEM classifies with the network that purifies)."""

    def __init__(self, jem: JEMEnergy):
        super().__init__()
        self.jem = jem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.jem.class_output(self.jem.f.features(x))


class ExportedNet(nn.Module):
    """A `torch.export` program's module used as a network: `train()`/`eval()` stop here (an exported
    graph has its mode baked in and refuses them); `energy=True` returns one value per image."""

    def __init__(self, module: nn.Module, energy: bool = False):
        super().__init__()
        self.program, self.energy = module, energy

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.program(x)
        return out.reshape(x.shape[0]) if self.energy else out


CONV_EBM_KEYS = tuple(f"f.{i}.{p}" for i in (0, 2, 4, 6, 8) for p in ("weight", "bias"))
_LAYER = re.compile(r"^layer1\.(\d+)\.")


def detect_ebm_format(obj, url: str) -> str:
    """The format `auto` reads `obj` as, or one line naming the choices where the content cannot tell."""
    if isinstance(obj, nn.Module):
        return "export"
    if isinstance(obj, dict) and obj.get("kind") == "ebm":
        return "debm"
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        return "jem"
    if isinstance(obj, dict) and set(obj) == set(CONV_EBM_KEYS):
        raise InputError(f"ebm_format=auto cannot tell what {url} holds: stochastic_security (LeakyReLU 0.05) and "
                         "mefa (soft_lrelu or silu) checkpoints have the same keys; set ebm_format to one of them")
    raise InputError(f"ebm_format=auto does not recognize {url}: set ebm_format to one of "
                     f"{', '.join(format_names('ebm'))}")


def _tensors(obj, url: str, what: str) -> dict:
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise InputError(f"{url} is not {what} (a state dict of tensors)")
    return obj


def _fit_exactly(net: nn.Module, state: dict, url: str, fmt: str) -> None:
    """Load strictly, or one line naming the format and the first key that does not fit."""
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = [f"{len(v)} {n} (e.g. {v[0]})" for n, v in (("missing", missing), ("unexpected", unexpected),
                                                                ("wrong shape", shapes)) if v]
        raise InputError(f"{url} does not fit format {fmt}: {', '.join(detail)}")
    finite_or_refuse(state, url)
    net.load_state_dict(state, strict=False)  # every key checked above


def conv_ebm(state: dict, url: str, fmt: str, activation: str, soft_alpha: float = SOFT_ALPHA,
             soft_eps: float = SOFT_EPS) -> EBM:
    """The paper's convnet from a bare `f.*` state dict (Stochastic Security, MEFA), as this project's EBM."""
    state = _tensors(state, url, f"a {fmt} EBM checkpoint")
    if set(state) != set(CONV_EBM_KEYS) or state["f.0.weight"].dim() != 4 or state["f.8.weight"].dim() != 4:
        extra = sorted(set(state) - set(CONV_EBM_KEYS)) or sorted(set(CONV_EBM_KEYS) - set(state))
        raise InputError(f"{url} does not fit format {fmt}: expected the keys f.0 ... f.8 (weight, bias), "
                         f"{'unexpected' if set(state) - set(CONV_EBM_KEYS) else 'missing'} {extra[0]}")
    if activation not in ACTIVATIONS:
        raise InputError(f"ebm_net.activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
    width, channels = state["f.0.weight"].shape[:2]
    ebm = EBM(int(width), int(state["f.8.weight"].shape[-1]) * 8, int(channels), activation, soft_alpha, soft_eps)
    _fit_exactly(ebm, {"net." + k[2:]: v for k, v in state.items()}, url, fmt)
    return ebm.eval()


def _wrn_shape(state: dict, prefix: str, url: str, fmt: str) -> tuple[int, int, int]:
    """(depth, widen, channels) of a released WRN from its keys and shapes."""
    blocks = {int(m.group(1)) for k in state if (m := _LAYER.match(k.removeprefix(prefix)))}
    first = state.get(f"{prefix}layer1.0.conv1.weight")
    if not blocks or first is None or first.dim() != 4 or state.get(f"{prefix}conv1.weight") is None:
        raise InputError(f"{url} does not fit format {fmt}: no {prefix}conv1 / {prefix}layer1.0.conv1 weights")
    return 6 * len(blocks) + 4, max(1, int(first.shape[0]) // 16), int(state[f"{prefix}conv1.weight"].shape[1])


def jem_ebm(obj, url: str) -> JEMEnergy:
    """JEM's energy from its checkpoint ({'model_state_dict': ..., 'replay_buffer': ...})."""
    state = obj.get("model_state_dict") if isinstance(obj, dict) else None
    state = _tensors(state, url, "a JEM checkpoint (its model_state_dict)")
    if "class_output.weight" not in state:
        raise InputError(f"{url} does not fit format jem: no class_output.weight")
    depth, widen, channels = _wrn_shape(state, "f.", url, "jem")
    net = JEMEnergy(depth, widen, int(state["class_output.weight"].shape[0]), channels)
    _fit_exactly(net, state, url, "jem")
    return net.eval()


def ebm_from_spec(ckpt: dict, url: str) -> JEMEnergy:
    """A project checkpoint of a non-convnet EBM (`network` entry; written by `debm import`)."""
    if ckpt.get("network") != "jem_wrn":
        raise InputError(f"EBM checkpoint {url} holds network {ckpt.get('network')!r}; this version knows jem_wrn")
    try:
        net = JEMEnergy(ckpt["depth"], ckpt["widen"], ckpt["num_classes"], ckpt["channels"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"EBM checkpoint {url} lacks valid depth, widen, num_classes, channels") from None
    _fit_exactly(net, _tensors(ckpt.get("state_dict"), url, "an EBM checkpoint"), url, "debm (jem_wrn)")
    return net.eval()


def ss_classifier(state, url: str, num_classes: int | None = None, mean=None, std=None) -> Classifier:
    """The authors' WRN (Stochastic Security, MEFA) from its bare state dict, keys `module.` stripped."""
    state = _tensors(state, url, "a stochastic_security classifier checkpoint")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "linear.weight" not in state:
        raise InputError(f"{url} does not fit format stochastic_security: no linear.weight")
    depth, widen, channels = _wrn_shape(state, "", url, "stochastic_security")
    classes = int(state["linear.weight"].shape[0])
    if num_classes is not None and classes != num_classes:
        raise InputError(f"{url} has {classes} classes, classifier.num_classes is {num_classes}")
    net = ReleasedWideResNet(depth, widen, classes, channels=channels)
    _fit_exactly(net, state, url, "stochastic_security")
    return Classifier(net, mean or HALF, std or HALF, "wrn28_10_ss" if (depth, widen) == (28, 10) else "wrn_ss").eval()


def jem_classifier(obj, url: str, num_classes: int | None = None) -> Classifier:
    """JEM's class head over its trunk, from its checkpoint."""
    net = jem_ebm(obj, url)
    if num_classes is not None and net.class_output.out_features != num_classes:
        raise InputError(f"{url} has {net.class_output.out_features} classes, classifier.num_classes is {num_classes}")
    return Classifier(JEMLogits(net), HALF, HALF, "jem").eval()


def exported(module: nn.Module, energy: bool) -> ExportedNet:
    return ExportedNet(module, energy).eval()


# ---- the builders of FORMATS: one per entry, each with the checks its format needs ----

SMOOTH = ("soft_lrelu", "silu")  # MEFA's activations: the same keys as the paper's LeakyReLU network
FIELDS = {"ebm": "ebm_format", "classifier": "classifier.format"}  # the setting that names a role's format


@dataclass(frozen=True)
class EBMOptions:
    """What the user says of an EBM file: the data's image size and channels, checked where the file records them,
    and the activation (ebm_net.activation / --activation), checked for the formats that record or imply one,
    required for mefa."""
    image_size: int | None = None
    channels: int | None = None
    activation: str | None = None
    soft_alpha: float = SOFT_ALPHA
    soft_eps: float = SOFT_EPS


def _not_exported(obj, url: str, role: str, fmt: str) -> None:
    if isinstance(obj, nn.Module):
        raise InputError(f"{url} is a torch.export program: set {FIELDS[role]}=export (not {fmt})")


def _no_activation(o: EBMOptions, url: str, fmt: str) -> None:
    """An activation named for a network that is not the convnet EBM is refused."""
    if o.activation is not None:
        raise InputError(f"ebm_net.activation={o.activation} names the convnet EBM's activation; {url} is read as "
                         f"{fmt}, another network: leave ebm_net.activation unset")


def _fits_data(ebm: EBM, url: str, o: EBMOptions) -> EBM:
    if o.image_size is not None and ebm.image_size != o.image_size:
        raise InputError(f"EBM {url} is for {ebm.image_size}x{ebm.image_size} images, the data are "
                         f"{o.image_size}x{o.image_size}")
    if o.channels is not None and ebm.channels != o.channels:
        raise InputError(f"EBM {url} is for {ebm.channels}-channel images, the data have {o.channels}")
    return ebm


def _debm_ebm(obj, url: str, o: EBMOptions) -> nn.Module:
    if isinstance(obj, dict) and "network" in obj:  # not the convnet: JEM's WRN energy, as `debm import` writes it
        _no_activation(o, url, "debm")
    _not_exported(obj, url, "ebm", "debm")
    if isinstance(obj, dict) and obj.get("kind") == "ebm" and "network" in obj:
        return ebm_from_spec(obj, url)
    return ebm_from_checkpoint(obj, url, o.image_size, o.channels, o.activation, o.soft_alpha, o.soft_eps)


def _ss_ebm(obj, url: str, o: EBMOptions) -> EBM:
    _not_exported(obj, url, "ebm", "stochastic_security")
    ebm = conv_ebm(obj, url, "stochastic_security", "lrelu")
    if o.activation is not None:
        check_activation(url, ebm.activation_spec(), o.activation, o.soft_alpha, o.soft_eps)
    return _fits_data(ebm, url, o)


def _mefa_ebm(obj, url: str, o: EBMOptions) -> EBM:
    _not_exported(obj, url, "ebm", "mefa")
    if o.activation not in SMOOTH:
        raise InputError(f"ebm_format=mefa: set ebm_net.activation (debm import: --activation) to "
                         f"{' or '.join(SMOOTH)}; the file's keys do not say which network it is")
    return _fits_data(conv_ebm(obj, url, "mefa", o.activation, o.soft_alpha, o.soft_eps), url, o)


def _jem_ebm(obj, url: str, o: EBMOptions) -> JEMEnergy:
    _no_activation(o, url, "jem")
    _not_exported(obj, url, "ebm", "jem")
    return jem_ebm(obj, url)


def _exported_ebm(obj, url: str, o: EBMOptions) -> ExportedNet:
    _no_activation(o, url, "export")
    if not isinstance(obj, nn.Module):
        raise InputError(f"{url} is not a torch.export program (.pt2), as ebm_format=export says")
    return exported(obj, energy=True)


def _debm_classifier(obj, url: str, c) -> Classifier:
    _not_exported(obj, url, "classifier", "debm")
    return classifier_from_checkpoint(obj, url, c.arch, c.num_classes, c.mean, c.std, c.wrn_depth, c.wrn_widen)


def _ss_classifier(obj, url: str, c) -> Classifier:
    _not_exported(obj, url, "classifier", "stochastic_security")
    return ss_classifier(obj, url, c.num_classes, c.mean, c.std)


def _jem_classifier(obj, url: str, c) -> Classifier:
    _not_exported(obj, url, "classifier", "jem")
    return jem_classifier(obj, url, c.num_classes)


def _exported_classifier(obj, url: str, c) -> Classifier:
    if not isinstance(obj, nn.Module):
        raise InputError(f"{url} is not a torch.export program (.pt2), as classifier.format=export says")
    return Classifier(exported(obj, energy=False), c.mean or HALF, c.std or HALF, "export").eval()


@dataclass(frozen=True)
class SourceFormat:
    role: str          # "ebm" or "classifier"
    name: str          # the value of ebm_format / classifier.format / --format
    reads: str         # how the file is read
    network: str       # what it builds
    inputs: str        # the input range the network expects
    purification: str  # the paper's purification settings
    build: Callable[[object, str, object], nn.Module]  # (content, url, options) -> the network; options:
    # `EBMOptions` for an EBM, for a classifier what a ClassifierConfig says (arch, num_classes, mean, std, wrn_*)


FORMATS = [
    SourceFormat("ebm", "debm", "this project's checkpoint (kind='ebm'), `weights_only=True`; also what "
                 "`debm import` writes", "the paper's convnet EBM (width, activation recorded), or JEM's WRN energy",
                 "[-1, 1]", "the checkpoint's own (PAPER.md: K = 1500, s = 1, sigma = 0.01)",
                 _debm_ebm),
    SourceFormat("ebm", "stochastic_security", "bare state dict `f.0` ... `f.8` (weight, bias), torch 1.4 legacy "
                 "serialization, `weights_only=True`", "5-conv EBM, LeakyReLU(0.05)", "[-1, 1]",
                 "Hill et al. 2021: K = 1500, s = 1, sigma = 0.01, no initial noise; 15 / 150 chains",
                 _ss_ebm),
    SourceFormat("ebm", "mefa", "bare state dict `f.0` ... `f.8`, `weights_only=True`; keys identical to "
                 "stochastic_security: the activation is named (ebm_net.activation / --activation)",
                 "5-conv EBM, soft_lrelu (a = 0.49, e = 0.01) or silu", "[-1, 1]",
                 "MEFA: N(0, 0.015^2) kick, then K = 1500 steps x - 0.5 grad f + 0.01 xi; EOT-20",
                 _mefa_ebm),
    SourceFormat("ebm", "jem", "dict with `model_state_dict` (and `replay_buffer`, ignored), `weights_only=True`",
                 "norm-free WRN trunk, LeakyReLU(0.2); energy = -logsumexp(class_output)", "[-1, 1]",
                 "Grathwohl et al. 2020: N(0, 0.03^2) kick, then K = 10 steps x - grad f + 0.01 xi; 5 chains",
                 _jem_ebm),
    SourceFormat("ebm", "export", "`torch.export.load` of a `.pt2` program (no pickled code)",
                 "any network: N x C x H x W images to one energy each", "[-1, 1] (as exported)",
                 "none recorded: set purify.*",
                 _exported_ebm),
    SourceFormat("classifier", "debm", "this project's checkpoint or a bare state dict of classifier.arch, "
                 "`weights_only=True`", "classifier.arch (method/nets/classifiers.py)",
                 "[-1, 1], then the arch's normalization", "-",
                 _debm_classifier),
    SourceFormat("classifier", "stochastic_security", "bare state dict of the authors' WRN-28-10 (183 tensors, a "
                 "bias on every convolution), legacy serialization, `weights_only=True`; MEFA's classifier is the "
                 "same network", "arch wrn28_10_ss", "[-1, 1]", "-",
                 _ss_classifier),
    SourceFormat("classifier", "jem", "JEM's checkpoint, as for its EBM", "the same WRN's class_output logits",
                 "[-1, 1]", "-",
                 _jem_classifier),
    SourceFormat("classifier", "export", "`torch.export.load` of a `.pt2` program (no pickled code)",
                 "any network: images to logits", "[-1, 1], then classifier.mean / std (e.g. mean 0, std 1 for a "
                 "network exported on [0, 1] pixels)", "-",
                 _exported_classifier),
]


def format_names(role: str) -> list[str]:
    return [f.name for f in FORMATS if f.role == role]


def format_table() -> str:
    """FORMATS as a Markdown table (docs/models.md)."""
    rows = ["| role | format | read as | network | inputs | paper's purification |", "|---|---|---|---|---|---|"]
    rows += [f"| {f.role} | `{f.name}` | {f.reads} | {f.network} | {f.inputs} | {f.purification} |" for f in FORMATS]
    return "\n".join(rows)


def source_format(role: str, name: str, obj, url: str) -> SourceFormat:
    """The entry of FORMATS that reads `obj` (the content of `url`) as the `role`'s format `name`; `auto`: as the
    content says (an EBM's where it can tell; a classifier is an exported program or this project's)."""
    if name != "auto" and name not in format_names(role):
        raise InputError(f"{FIELDS[role]} must be auto or one of {', '.join(format_names(role))} (got {name!r})")
    if name == "auto":
        name = detect_ebm_format(obj, url) if role == "ebm" else "export" if isinstance(obj, nn.Module) else "debm"
    return next(f for f in FORMATS if f.role == role and f.name == name)


def build_network(role: str, name: str, obj, url: str, options) -> nn.Module:
    """The network `obj` (the content of `url`) holds, read as the `role`'s format `name` by its entry's builder;
    `options`: `EBMOptions` for an EBM, the ClassifierConfig's fields for a classifier."""
    return source_format(role, name, obj, url).build(obj, url, options)


__all__ = ["CONV_EBM_KEYS", "FORMATS", "LRELU_SLOPE", "SMOOTH", "EBMOptions", "ExportedNet", "JEMEnergy", "JEMLogits",
           "ReleasedWideResNet", "SourceFormat", "build_network", "conv_ebm", "detect_ebm_format", "ebm_from_spec",
           "exported", "format_names", "format_table", "jem_classifier", "jem_ebm", "source_format", "ss_classifier"]
