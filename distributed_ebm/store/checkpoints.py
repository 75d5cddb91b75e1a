"""Every checkpoint of the project, saved and loaded here: weights files and training checkpoints, EBM and classifier.

Weights files (`save_ebm`, `load_classifier`, `save_classifier`): one network at any URL, read with
weights_only=True, written atomically. An EBM is read by store/released.py `load_ebm`, in any format.

The EBM training checkpoint: a compact file (`ckpt.pt`) plus, where the bank is kept, its parts. Every entry
writes it: the single-process and one-GPU runs (local/train.py) into their output folder, the Ray Train run into
each checkpoint folder. `ckpt.pt` holds the EBM in the layout `load_ebm` (store/released.py) reads (so an attack
takes it as `ebm=` like any EBM checkpoint), the optimizer state and phase, the iteration, the loss and energy
history, one record per training session and the fingerprint of the settings that change results. Beside it,
`bank-k.pt` holds part k of the persistent bank (one part in one process, one per replay-buffer actor on Ray).
The iteration is the whole RNG position: every draw of iteration t comes from (seed, t) and every chain's noise
from (seed, slot, t), and nothing reads torch's global generator, so model + optimizer + bank resume a run exactly.

A checkpoint that travels without its bank (between one-GPU sessions that return only a few small files; the
paper's bank is 600 MB) resumes by a *re-burn* (`method.bank.reburn`): every chain starts afresh from
`bank_init` and runs Langevin steps under the current EBM (a deviation from the paper, whose bank persists
through the whole run; the model card states it).

The classifier training checkpoint (`checkpoint.pt`, in the output folder of the single-process run and in each
Ray Train checkpoint folder): classifier, optimizer, schedule, epoch and history, under the `*_KEY` names below.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..config import to_yaml
from ..errors import InputError
from ..method.bank import ImageBank
from ..method.nets import EBM, Classifier, classifier_checkpoint, classifier_from_checkpoint, ebm_checkpoint
from . import storage
from .provenance import flat

FORMAT = "debm-compact-ebm-1"
CKPT = "ckpt.pt"
CLASSIFIER_CKPT = "checkpoint.pt"  # the classifier's training checkpoint, in every entry's folder
_OLD_CLASSIFIER_CKPTS = ("state.pt",)  # the name Ray Train checkpoints used before: read on resume, never written
# The entries of the classifier's training checkpoint
KIND_KEY, CLASSIFIER_TRAINING = "kind", "classifier_training"  # KIND_KEY holds CLASSIFIER_TRAINING
EPOCH_KEY = "epoch"  # epochs done
CLASSIFIER_KEY = "classifier"  # the classifier's state dict
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
HISTORY_KEY = "history"  # one metrics dict per epoch
CONFIG_KEY = "config"  # the run's settings, as YAML
# Every training setting is one or the other: a test fails on a setting named in neither.
# change the trained EBM: a resume must match them
RESULT_KEYS = ("ebm", "init_ebm", "init_ebm_format", "langevin", "batch_size", "data_noise", "adam_lr", "sgd_start",
               "sgd_lr", "bank_size", "bank_init", "rejuvenation", "seed", "precision")
# result keys added since checkpoints were first written: their value before
ADDED = {"precision": "float32", "init_ebm": None, "init_ebm_format": "auto"}
FREE_KEYS = ("iterations", "checkpoint_every", "log_every", "output", "name", "ray", "mlflow",
             "data")  # do not (the data count by content, `data_fingerprint`: their path differs between machines)


def settings_fingerprint(cfg) -> dict:
    """The result-changing settings, flat (`langevin.steps`: 100, ...)."""
    return flat(cfg.model_dump(mode="json", include=set(RESULT_KEYS)))


def data_fingerprint(data) -> dict:
    """The training images by count and content (their path differs from machine to machine)."""
    pixels = data.pixels()
    return {"data.images": len(data), "data.sha256": hashlib.sha256(memoryview(pixels).cast("B")).hexdigest()[:16]}


def check_fingerprint(saved: dict, now: dict, url: str) -> None:
    """One line naming every differing setting (only the keys of `now` are compared)."""
    saved = {**ADDED, **saved}
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        raise InputError(f"{url} was trained with {', '.join(f'{k}={saved.get(k)}' for k in diff)}; this run has "
                         f"{', '.join(f'{k}={now[k]}' for k in diff)} (settings that change results must match "
                         f"to resume)")


def bank_part(folder: str, k: int) -> str:
    """Where part k of the bank lies beside a training checkpoint in `folder`."""
    return storage.join(folder, f"bank-{k}.pt")


def save_bank(bank: ImageBank, url: str) -> None:
    """A bank's part (its chains and their steps), atomically."""
    storage.save_torch(bank.state_dict(), url)


def load_bank(bank: ImageBank, url: str) -> None:
    """Put the part saved at `url` into `bank`."""
    bank.load_state_dict(storage.load_torch(url))


def save_checkpoint(folder: str, ebm: nn.Module, iteration: int, phase: str, optimizer: torch.optim.Optimizer,
                    fingerprint: dict, config_yaml: str, history: dict, sessions: list) -> dict:
    """`folder/ckpt.pt`, atomically, as an EBM checkpoint (kind 'ebm') with the training state under 'training';
    returns it. The bank's parts are written beside it by whoever holds the bank."""
    state = ebm_checkpoint(ebm, iteration=iteration, training={
        "format": FORMAT, "phase": phase, "optimizer": optimizer.state_dict(), "fingerprint": fingerprint,
        "config": config_yaml, "history": history, "sessions": sessions})
    storage.save_torch(state, storage.join(folder, CKPT))
    return state


def load_checkpoint(url: str) -> dict:
    """A training checkpoint (`ckpt.pt`), checked to be one: one line otherwise."""
    try:
        state = storage.load_torch(url)
    except FileNotFoundError:
        raise InputError(f"checkpoint {url} does not exist") from None
    if not isinstance(state, dict) or state.get("kind") != "ebm" \
            or not isinstance(state.get("training"), dict) or state["training"].get("format") != FORMAT:
        raise InputError(f"{url} is not an EBM training checkpoint (format {FORMAT})")
    return state


def save_classifier_training(folder: str, cfg, epoch: int, clf: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler, history: list) -> None:
    """`folder/checkpoint.pt`, atomically: the classifier's training state after `epoch` epochs (every entry's)."""
    state = {KIND_KEY: CLASSIFIER_TRAINING, EPOCH_KEY: epoch, CLASSIFIER_KEY: clf.state_dict(),
             OPTIMIZER_KEY: optimizer.state_dict(), SCHEDULER_KEY: scheduler.state_dict(), HISTORY_KEY: history,
             CONFIG_KEY: to_yaml(cfg)}
    storage.save_torch(state, storage.join(folder, CLASSIFIER_CKPT))


def load_classifier_training(folder: str, clf: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                             missing_ok: bool = True) -> tuple[int, list]:
    """Resume from the classifier training checkpoint in `folder` (under its name of before too): load
    classifier, optimizer and schedule in place; returns (epochs done, history), or (0, []) where there is none
    and `missing_ok`."""
    for name in (CLASSIFIER_CKPT, *_OLD_CLASSIFIER_CKPTS):
        url = storage.join(folder, name)
        if storage.exists(url):
            break
    else:
        if missing_ok:
            return 0, []
        raise InputError(f"{folder} holds no classifier training checkpoint ({CLASSIFIER_CKPT})")
    state = storage.load_torch(url)
    if not isinstance(state, dict) or any(k not in state for k in (CLASSIFIER_KEY, OPTIMIZER_KEY, SCHEDULER_KEY,
                                                                     EPOCH_KEY, HISTORY_KEY)):
        raise InputError(f"{url} is not a classifier training checkpoint (it needs {CLASSIFIER_KEY}, {OPTIMIZER_KEY}, "
                         f"{SCHEDULER_KEY}, {EPOCH_KEY} and {HISTORY_KEY})")
    clf.load_state_dict(state[CLASSIFIER_KEY])
    optimizer.load_state_dict(state[OPTIMIZER_KEY])
    scheduler.load_state_dict(state[SCHEDULER_KEY])
    return state[EPOCH_KEY], state[HISTORY_KEY]


def save_ebm(ebm: EBM, url: str, **extra) -> None:
    storage.save_torch(ebm_checkpoint(ebm, **extra), url)


def load_classifier(arch: str, url: str, num_classes: int = 10, mean=None, std=None,
                    wrn_depth: int = 28, wrn_widen: int = 10, map_location="cpu") -> Classifier:
    return classifier_from_checkpoint(storage.load_torch(url, map_location), url, arch, num_classes, mean, std,
                                      wrn_depth, wrn_widen)


def save_classifier(clf: Classifier, url: str, **extra) -> None:
    storage.save_torch(classifier_checkpoint(clf, **extra), url)
