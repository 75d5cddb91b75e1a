"""The training jobs' parts every executor shares (one process, `local/train.py`; Ray Train, `distributed/`):
the preflight, every input a job will touch checked before any expensive work so a bad one fails in seconds
with one line, and the classifier's training checkpoint. The loop itself is the method's (`training.run_ebm`
over `EBMIteration`, `training.run_classifier`)."""
from __future__ import annotations

from ..config import TrainClassifierConfig, TrainEBMConfig
from ..errors import InputError
from ..method.training import check_sizes
from ..store import storage
from ..store.data import ImageSet, check_labels
from ..store.tracking import check_tracking


def preflight_ebm(cfg: TrainEBMConfig, data: ImageSet, tracking: bool = True) -> None:
    """Sizes, channels, bank shards, the output, MLflow (`tracking`)."""
    check_sizes(cfg, len(data))
    if data.data.shape[1] != cfg.ebm.channels:
        raise InputError(f"ebm.channels = {cfg.ebm.channels} but the images of {cfg.data.path} have "
                         f"{data.data.shape[1]} channels")
    shards, size = cfg.ray.bank_shards, cfg.bank_size or len(data)
    if shards > size:
        raise InputError(f"ray.bank_shards = {shards} is more than the bank's {size} chains (bank_size): "
                         "every shard must hold at least one chain")
    storage.check_destination(cfg.output, "output", folder=True)
    if tracking:
        check_tracking(cfg.mlflow)


def preflight_classifier(cfg: TrainClassifierConfig, data: ImageSet, test: ImageSet | None,
                         tracking: bool = True) -> None:
    """Labels of the training and test data, the output, MLflow (`tracking`)."""
    check_labels(data, cfg.classifier.num_classes, f"data {cfg.data.path}")
    if test is not None:
        check_labels(test, cfg.classifier.num_classes, f"test_data {cfg.test_data.path}")
    storage.check_destination(cfg.output, "output", folder=True)
    if tracking:
        check_tracking(cfg.mlflow)
