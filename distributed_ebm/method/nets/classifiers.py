"""Classifiers the defense secures, all used the same way: images in [-1, 1] in, logits out.

- CIFAR ResNet-20/32/44/56 (He et al. 2016, sec. 4.2; 'option A' shortcuts) with the key
  names of the widely shared pretrained CIFAR-10 ResNet checkpoints, which load as they are.
- WideResNet-28-10 (Zagoruyko & Komodakis 2016): `wrn28_10` / `wrn` are this project's bias-free variant;
  `wrn28_10_ss` / `wrn_ss` the Stochastic Security authors' network (a bias on every convolution, their
  key names), which their released classifier and MEFA's load into (formats.py reads those files).
`Classifier` maps [-1, 1] images to the network's own input normalization.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from .ebm import finite_or_refuse

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # (p - 0.5) / 0.5 = x: the network sees [-1, 1] images unchanged


class _PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (got {depth})")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv, 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout:
            y = F.dropout(y, self.dropout, self.training)
        y = self.conv2(y)
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (got {depth})")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a bias on every convolution, the stride on the second
    convolution and a 1x1 convolution of the block's raw input as shortcut where the shape changes
    (the layout of the wide-resnet.pytorch code the released WRNs come from). `norm=False`: no BN
    (JEM's trunk); `slope`: the LeakyReLU slope (0 = ReLU)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: bool, slope: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes) if norm else nn.Identity()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride))
                         if stride != 1 or in_planes != planes else nn.Identity())
        self.slope = slope

    def forward(self, x):
        y = self.conv1(F.leaky_relu(self.bn1(x), self.slope))
        y = self.conv2(F.leaky_relu(self.bn2(y), self.slope))
        return y + self.shortcut(x)


class ReleasedWideResNet(nn.Module):
    """The WideResNet of the Stochastic Security and MEFA classifiers (arch `wrn28_10_ss`, `wrn_ss`) and of JEM's
    trunk (`norm=False`, LeakyReLU(0.2)). Unlike this project's `WideResNet` (bias-free convolutions,
    stride on the first convolution, shortcut from the activated input) its state dict has 183 tensors
    at 28-10, keys `conv1`, `layer1..3.{i}.{bn1,conv1,bn2,conv2,shortcut.0}`, `bn1`, `linear`."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, norm: bool = True,
                 slope: float = 0.0, channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (got {depth})")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1)
        stages, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            stages.append(nn.Sequential(*[_PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1,
                                                       norm, slope) for i in range(n)]))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.bn1 = nn.BatchNorm2d(in_planes) if norm else nn.Identity()
        self.linear = nn.Linear(in_planes, num_classes)
        self.slope, self.depth, self.widen = slope, depth, widen

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.leaky_relu(self.bn1(out), self.slope).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class Classifier(nn.Module):
    """Wraps a network: [-1, 1] images -> p = (x + 1) / 2 -> (p - mean) / std -> logits."""

    def __init__(self, net: nn.Module, mean=HALF, std=HALF, arch: str = "custom"):
        super().__init__()
        self.net, self.arch = net, arch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(((x + 1) * 0.5 - self.mean) / self.std)


# classifier.arch -> (network, default input normalization) from (num_classes, wrn_depth, wrn_widen); the
# ResNets default to the checkpoints' ImageNet normalization
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
ARCHITECTURES = {
    "resnet20": lambda n, depth, widen: (CifarResNet(20, n), IMAGENET),
    "resnet32": lambda n, depth, widen: (CifarResNet(32, n), IMAGENET),
    "resnet44": lambda n, depth, widen: (CifarResNet(44, n), IMAGENET),
    "resnet56": lambda n, depth, widen: (CifarResNet(56, n), IMAGENET),
    "wrn28_10": lambda n, depth, widen: (WideResNet(28, 10, n), (HALF, HALF)),
    "wrn": lambda n, depth, widen: (WideResNet(depth, widen, n), (HALF, HALF)),
    "wrn28_10_ss": lambda n, depth, widen: (ReleasedWideResNet(28, 10, n), (HALF, HALF)),
    "wrn_ss": lambda n, depth, widen: (ReleasedWideResNet(depth, widen, n), (HALF, HALF)),
}


def build_classifier(arch: str, num_classes: int = 10, mean=None, std=None,
                     wrn_depth: int = 28, wrn_widen: int = 10) -> Classifier:
    """A freshly initialized classifier of `arch` (a key of ARCHITECTURES)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown classifier arch {arch!r}; known: {', '.join(ARCHITECTURES)}")
    net, default = ARCHITECTURES[arch](num_classes, wrn_depth, wrn_widen)
    return Classifier(net, mean or default[0], std or default[1], arch)


def _fit(net: nn.Module, state: dict, url: str, arch: str) -> None:
    """Load strictly, or say plainly that the checkpoint is for another architecture."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # older torch omits it
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                detail.append(f"{len(keys)} {name} (e.g. {keys[0]})")
        raise InputError(f"checkpoint {url} does not fit architecture {arch!r}: {', '.join(detail)}; "
                         "it was saved from a different network")
    finite_or_refuse(state, url)
    net.load_state_dict(state, strict=False)  # every key checked above


def classifier_from_checkpoint(ckpt, url: str, arch: str, num_classes: int = 10, mean=None, std=None,
                               wrn_depth: int = 28, wrn_widen: int = 10) -> Classifier:
    """Build `arch` and load the checkpoint `ckpt` (read from `url`, which messages name) into it:
    {"state_dict": ...} (key prefix `module.` allowed) or a bare state dict."""
    saved_arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if saved_arch is not None and saved_arch != arch:
        raise InputError(f"checkpoint {url} holds a {saved_arch!r} classifier, not {arch!r}")
    if isinstance(ckpt, dict) and ckpt.get("wrn_depth") and arch in ("wrn", "wrn_ss"):
        wrn_depth, wrn_widen = ckpt["wrn_depth"], ckpt["wrn_widen"]
    state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    if isinstance(ckpt, dict) and mean is None and "mean" in ckpt:
        mean, std = ckpt["mean"], ckpt["std"]
    clf = build_classifier(arch, num_classes, mean, std, wrn_depth, wrn_widen)
    _fit(clf.net, state, url, arch)
    return clf.eval()


def classifier_checkpoint(clf: Classifier, **extra) -> dict:
    """What a classifier checkpoint holds: arch, weights, input normalization (and a WRN's shape)."""
    meta = {}
    if isinstance(clf.net, WideResNet) and clf.arch == "wrn":
        meta = {"wrn_depth": len(clf.net.block1) * 6 + 4, "wrn_widen": clf.net.fc.in_features // 64}
    elif clf.arch == "wrn_ss":
        meta = {"wrn_depth": clf.net.depth, "wrn_widen": clf.net.widen}
    return {"arch": clf.arch, "state_dict": clf.net.state_dict(), "mean": clf.mean.flatten().tolist(),
            "std": clf.std.flatten().tolist(), **meta, **extra}
