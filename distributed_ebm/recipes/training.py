"""One preflight per job: every input it will touch (config, files, checkpoints, data contents,
destinations, services) checked before any expensive work, so a bad one fails in seconds with
one line instead of after the attack or the training. Plain PyTorch: no Ray starts here."""
from __future__ import annotations

from ..store import storage
from ..errors import InputError
from ..config import AttackConfig, TrainClassifierConfig, TrainEBMConfig
from ..store.data import Catalog, ImageSet, check_labels, load, read_rows
from ..store.tracking import check_tracking


def attack(cfg: AttackConfig, data: Catalog | ImageSet | None = None) -> Catalog | ImageSet:
    """Data and subset, labels, classifier and EBM (sizes, finiteness), the output, MLflow. A catalog's
    pixels stay unread but for its first image's (its size)."""
    from .attack import build_attack

    data = data if data is not None else load(cfg.data)
    if len(data) == 0:
        raise InputError("the selected subset holds no image")
    width = (read_rows(data.take([0]), cfg.data.image_size) if isinstance(data, Catalog) else data).data.shape[-1]
    if width != cfg.data.image_size:
        raise InputError(f"images are {width} pixels wide, data.image_size is {cfg.data.image_size}")
    check_labels(data, cfg.classifier.num_classes, f"data {cfg.data.path}")
    storage.check_destination(cfg.output, "output", folder=True)
    build_attack(cfg, "cpu")  # loads the classifier and the EBM: missing files, wrong architecture or size
    check_tracking(cfg.mlflow)
    return data


def train_ebm(cfg: TrainEBMConfig, data: ImageSet) -> None:
    """Sizes, channels, the output, MLflow: before Ray Train starts."""
    from ..method.training import check_sizes

    check_sizes(cfg, len(data))
    if data.data.shape[1] != cfg.ebm.channels:
        raise InputError(f"ebm.channels = {cfg.ebm.channels} but the images of {cfg.data.path} have "
                         f"{data.data.shape[1]} channels")
    shards, size = cfg.ray.bank_shards, cfg.bank_size or len(data)
    if shards > size:
        raise InputError(f"ray.bank_shards = {shards} is more than the bank's {size} chains (bank_size): "
                         "every shard must hold at least one chain")
    storage.check_destination(cfg.output, "output", folder=True)
    check_tracking(cfg.mlflow)


def train_classifier(cfg: TrainClassifierConfig, data: ImageSet, test: ImageSet | None) -> None:
    check_labels(data, cfg.classifier.num_classes, f"data {cfg.data.path}")
    if test is not None:
        check_labels(test, cfg.classifier.num_classes, f"test_data {cfg.test_data.path}")
    storage.check_destination(cfg.output, "output", folder=True)
    check_tracking(cfg.mlflow)
