"""The one EBM training checkpoint: a compact file (`ckpt.pt`) plus, where the bank is kept, its parts.

Every entry writes it: the single-process and one-GPU runs (local/train.py) into their output folder, the
Ray Train run into each checkpoint folder. `ckpt.pt` holds the EBM in the layout `store.weights.load_ebm`
reads (so an attack takes it as `ebm=` like any EBM checkpoint), the optimizer state and phase, the
iteration, the loss and energy history, one record per training session and the fingerprint of the
settings that change results. Beside it, `bank-k.pt` holds part k of the persistent bank (one part in
one process, one per replay-buffer actor on Ray). The iteration is the whole RNG position: every draw of
iteration t comes from (seed, t) and every chain's noise from (seed, slot, t), and nothing reads torch's
global generator, so model + optimizer + bank resume a run exactly.

A checkpoint that travels without its bank (between one-GPU sessions that return only a few small files; the
paper's bank is 600 MB) resumes by a *re-burn*: every chain starts afresh from `bank_init` and runs Langevin
steps under the current EBM (a deviation from the paper, whose bank persists through the whole run; the
model card states it).
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..errors import InputError
from ..method.bank import ImageBank
from ..method.langevin import langevin
from ..method.noise import ChainKeys
from . import storage
from .provenance import flat

FORMAT = "debm-compact-ebm-1"
CKPT = "ckpt.pt"
CALL_REBURN = 0x7FFF0003  # the noise of a re-burn; its replicate number is the iteration it resumes at
# Every training setting is one or the other: a test fails on a setting named in neither.
RESULT_KEYS = ("ebm", "langevin", "batch_size", "data_noise", "adam_lr", "sgd_start", "sgd_lr", "bank_size",
               "bank_init", "rejuvenation", "seed", "precision")  # change the trained EBM: a resume must match them
ADDED = {"precision": "float32"}  # result keys added since checkpoints were first written: their value before
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
    return storage.join(folder, f"bank-{k}.pt")


def save_checkpoint(folder: str, ebm: nn.Module, iteration: int, phase: str, optimizer: torch.optim.Optimizer,
                    fingerprint: dict, config_yaml: str, history: dict, sessions: list) -> dict:
    """`folder/ckpt.pt`, atomically, as an EBM checkpoint (kind 'ebm') with the training state under 'training';
    returns it. The bank's parts are written beside it by whoever holds the bank."""
    state = {"kind": "ebm", **ebm.spec(), "state_dict": ebm.state_dict(), "iteration": iteration,
             "training": {"format": FORMAT, "phase": phase, "optimizer": optimizer.state_dict(),
                          "fingerprint": fingerprint, "config": config_yaml, "history": history, "sessions": sessions}}
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


def reburn(bank: ImageBank, ebm: nn.Module, cfg, steps: int, resume_at: int,
           device: str | torch.device = "cpu", chunk: int = 10_000, target: float | None = None, check: int = 10,
           on_chunk=None) -> int:
    """Rebuild the whole bank: fresh starts from `bank_init`, then Langevin steps under `ebm`; returns the steps.

    With `target` (the bank's mean energy at the last save, measured under this same EBM) the first chunk
    runs, `check` steps at a time, until its mean energy falls to the target (at most `steps`), and every
    other chunk then runs as many steps; without it, every chain runs `steps`. The noise is keyed by
    (seed, slot, resume iteration), and a chain continued in pieces draws what it would in one run.
    """
    bank.reset()
    lv = cfg.langevin
    slots = torch.arange(bank.offset, bank.offset + len(bank))
    for lo in range(0, len(bank), chunk):
        s = slots[lo:lo + chunk]
        keys = ChainKeys(cfg.seed, s, torch.full_like(s, resume_at), CALL_REBURN)
        x = bank.states[s - bank.offset].to(device)
        if lo == 0 and target is not None:
            done = 0
            while done < steps and energy_stats(ebm, x, device)["mean"] > target:
                n = min(check, steps - done)
                x, done = langevin(ebm, x, keys, n, lv.step_size, lv.noise, start_step=done), done + n
            steps = done
        elif steps:
            x = langevin(ebm, x, keys, steps, lv.step_size, lv.noise)
        bank.states[s - bank.offset] = x.cpu().contiguous()
        if on_chunk:
            on_chunk(min(lo + chunk, len(bank)), steps)
    bank.steps[:] = steps
    return steps


@torch.no_grad()
def energy_stats(ebm: nn.Module, states: torch.Tensor, device: str | torch.device = "cpu", count: int | None = None,
                 chunk: int = 2000) -> dict:
    """Mean and sd of f over `count` chains spread evenly through the bank (all of them for None)."""
    n = len(states) if count is None else min(count, len(states))
    rows = torch.linspace(0, len(states) - 1, n).round().long()
    f = torch.cat([ebm(states[rows[i:i + chunk]].to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
                   for i in range(0, n, chunk)])
    return {"mean": f.mean().item(), "std": f.std().item() if n > 1 else 0.0, "chains": n}
