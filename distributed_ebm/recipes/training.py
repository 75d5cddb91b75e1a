"""The training jobs' parts every executor shares (one process, `local/train.py`; Ray Train, `distributed/`):
the EBM at iteration 0 (new, or fine-tuned from a released file), and the preflight, every input a job will touch
checked before any expensive work so a bad one fails in seconds with one line. The loop itself is the method's
(`training.run_ebm` over `EBMIteration`, `training.run_classifier`)."""
from __future__ import annotations

from ..config import TrainClassifierConfig, TrainEBMConfig
from ..errors import InputError
from ..method.nets import EBM
from ..method.nets.ebm import check_activation
from ..method.training import check_sizes, new_ebm
from ..store import storage
from ..store.data import ImageSet, check_labels
from ..store.released import load_ebm
from ..store.tracking import check_tracking


def initial_ebm(cfg: TrainEBMConfig) -> EBM:
    """The EBM at iteration 0: new weights from the seed, or, to fine-tune, those of `init_ebm` read as
    `init_ebm_format` (a released file as it is, or this project's checkpoint), which must be the network `ebm`
    describes."""
    ebm = new_ebm(cfg)
    if cfg.init_ebm is None:
        return ebm
    e, url, fmt = cfg.ebm, cfg.init_ebm, cfg.init_ebm_format
    other = (f"init_ebm {url} holds another network than the convnet EBM training builds: fine-tune a debm, "
             "stochastic_security or mefa file")
    if fmt in ("jem", "export"):
        raise InputError(other)
    # MEFA's file does not say its activation: the config's names it; every other file's is checked against it
    start = load_ebm(url, fmt, e.image_size, e.channels, e.activation if fmt == "mefa" else None, e.soft_alpha,
                     e.soft_eps)
    if not isinstance(start, EBM):
        raise InputError(other)
    check_activation(url, start.activation_spec(), e.activation, e.soft_alpha, e.soft_eps)
    try:
        ebm.load_state_dict(start.state_dict())
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise InputError(f"init_ebm {cfg.init_ebm} does not fit ebm (width {e.width}): {detail}") from None
    return ebm


def preflight_ebm(cfg: TrainEBMConfig, data: ImageSet, tracking: bool = True) -> None:
    """Sizes, channels, bank shards, the EBM to fine-tune (`init_ebm`), the output, MLflow (`tracking`)."""
    check_sizes(cfg, len(data))
    initial_ebm(cfg)
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
