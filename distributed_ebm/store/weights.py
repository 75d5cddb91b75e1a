"""EBM and classifier weight files at any URL: read with weights_only=True, written atomically."""
from __future__ import annotations

from ..method.nets import EBM, Classifier, classifier_checkpoint, classifier_from_checkpoint, ebm_checkpoint, ebm_from_checkpoint
from ..method.nets.ebm import SOFT_ALPHA, SOFT_EPS
from . import storage


def load_ebm(url: str, image_size: int | None = None, map_location="cpu", channels: int | None = None,
             activation: str | None = None, soft_alpha: float = SOFT_ALPHA, soft_eps: float = SOFT_EPS) -> EBM:
    """The EBM of a checkpoint (`nets.ebm_from_checkpoint` says what is checked)."""
    return ebm_from_checkpoint(storage.load_torch(url, map_location), url, image_size, channels, activation,
                               soft_alpha, soft_eps)


def save_ebm(ebm: EBM, url: str, **extra) -> None:
    storage.save_torch(ebm_checkpoint(ebm, **extra), url)


def load_classifier(arch: str, url: str, num_classes: int = 10, mean=None, std=None,
                    wrn_depth: int = 28, wrn_widen: int = 10, map_location="cpu") -> Classifier:
    return classifier_from_checkpoint(storage.load_torch(url, map_location), url, arch, num_classes, mean, std,
                                      wrn_depth, wrn_widen)


def save_classifier(clf: Classifier, url: str, **extra) -> None:
    storage.save_torch(classifier_checkpoint(clf, **extra), url)
