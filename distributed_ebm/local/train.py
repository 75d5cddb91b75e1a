"""Training in one process on one device, without Ray: the EBM (resumable, within a wall-clock budget if
asked) and natural classifiers.

`LocalTraining` runs the method's loop (`training.run_ebm` over `EBMIteration`, the bank in memory) and
writes the one training checkpoint (`store/checkpoints.py`: `ckpt.pt`, plus `bank-0.pt` where the bank is
kept). `train_ebm` is the plain single-process run: it keeps the bank, so a rerun into the same output
continues exactly. The one-GPU job (`debm train-ebm-gpu`, jobs/train_ebm_gpu.py) runs `LocalTraining` a
session at a time on any machine with one GPU and no Ray, MLflow or s3fs: each session trains for
`--minutes`, then leaves in `--out` the compact checkpoint (about 8 MB for the paper's EBM), a sample grid of
the bank, the loss and energy curves and the model card; the next session, on any machine, continues with
`--resume`, re-burning the bank where it did not travel.
"""
from __future__ import annotations

import copy
import datetime
import math
import platform
import time

import torch

from ..config import TrainClassifierConfig, TrainEBMConfig, to_yaml
from ..errors import InputError
from ..method.bank import ImageBank, energy_stats, reburn
from ..method.precision import set_arithmetic
from ..method.training import (
    METRICS,
    EBMIteration,
    LocalBank,
    check_sizes,
    classifier_optimizer,
    new_classifier,
    run_classifier,
    run_ebm,
    time_split,
)
from ..progress import Progress
from ..recipes.training import initial_ebm, preflight_classifier, preflight_ebm
from ..results.card import write_card
from ..results.report import image_grid_png
from ..store import storage
from ..store.checkpoints import (
    CKPT,
    bank_part,
    check_fingerprint,
    data_fingerprint,
    load_bank,
    load_checkpoint,
    load_classifier_training,
    save_bank,
    save_checkpoint,
    save_classifier,
    save_classifier_training,
    settings_fingerprint,
)
from ..store.data import ImageSet, read_images

GRID = 64  # bank chains in each session's sample grid


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class LocalTraining:
    """One process's EBM run: build, or resume from a checkpoint `resume` (its bank from `bank-0.pt` in
    `resume_bank`'s folder where there is one, else re-burned), train, save into `out` (None: nowhere).

    `keep_bank`: write the bank beside each checkpoint, so a resume is exact; `card`: also the session's
    sample grid and the model card (README.md, curves.png)."""

    def __init__(self, cfg: TrainEBMConfig, data: ImageSet, out: str | None = None,
                 device: str | torch.device = "cpu", resume: dict | None = None, resume_bank: str | None = None,
                 keep_bank: bool = True, card: bool = False, minutes: float | None = None, log=print,
                 started: float | None = None):
        check_sizes(cfg, len(data))
        device = torch.device(device)
        self.cfg, self.data, self.out, self.device, self.log = cfg, data, out, device, log
        self.keep_bank, self.card = keep_bank, card
        set_arithmetic(device, cfg.precision)  # as every trainer: TF32 on CUDA unless float32_strict
        self.fingerprint = {**settings_fingerprint(cfg), **data_fingerprint(data)}
        self.ebm = initial_ebm(cfg).to(device)
        shape = tuple(data.data.shape[1:])
        self.bank = ImageBank(cfg.bank_size or len(data), shape, cfg.bank_init, cfg.seed, data.data)
        self.ebm_iteration = EBMIteration(cfg, self.ebm, LocalBank(self.bank), lambda rows: data.floats(rows, device),
                                          len(data), shape, len(self.bank), device=device)
        self.history = {"iteration": [], **{k: [] for k in METRICS}, "bank_energy": []}
        self.sessions: list[dict] = []
        self.t0, self.saved_at = started or time.monotonic(), None  # the session's minutes count from t0
        self.record = {"session": 1, "start_iteration": 0, "end_iteration": 0, "device": device_name(device),
                       "torch": str(torch.__version__), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"), "minutes_budget": minutes, "seconds": 0.0, "train_seconds": 0.0,
                       "iterations_per_second": None, "reburn": None, "grid": None}
        if resume is not None:
            self._resume(resume, resume_bank)

    iteration = property(lambda self: self.ebm_iteration.iteration)
    phase = property(lambda self: self.ebm_iteration.phase)
    optimizer = property(lambda self: self.ebm_iteration.optimizer)

    def step(self) -> dict:
        return self.ebm_iteration.step()

    def _resume(self, state: dict, bank_folder: str | None) -> None:
        cfg, tr, it = self.cfg, state["training"], state["iteration"]
        check_fingerprint(tr["fingerprint"], self.fingerprint, "the checkpoint")
        self.ebm.load_state_dict(state["state_dict"])
        self.ebm_iteration.resume(it, tr["phase"], tr["optimizer"])
        self.history, self.sessions = copy.deepcopy(tr["history"]), copy.deepcopy(tr["sessions"])
        for k in METRICS:  # a history written before a metric was logged: gaps for the earlier windows
            self.history.setdefault(k, [math.nan] * len(self.history["iteration"]))
        self.record.update(session=len(self.sessions) + 1, start_iteration=it, end_iteration=it)
        part = bank_part(bank_folder, 0) if bank_folder is not None else None
        if part is not None and storage.exists(part):
            load_bank(self.bank, part)
            self.log(f"resuming at iteration {it} with the bank saved beside the checkpoint ({part})")
            return
        if not hasattr(cfg, "reburn_steps"):
            raise InputError(f"the checkpoint at iteration {it} has no bank beside it ({part}); "
                             "the one-GPU job (jobs/train_ebm_gpu.py) resumes it with a re-burned bank")
        self._reburn(it)

    def _reburn(self, it: int) -> None:
        cfg, t = self.cfg, time.monotonic()
        saved = [e for e in self.history["bank_energy"] if e["iteration"] == it]
        target = saved[-1]["mean"] if saved and cfg.reburn_match else None
        self.log(f"re-burning the bank: {len(self.bank)} fresh chains ({cfg.bank_init}), at most {cfg.reburn_steps} "
                 f"Langevin steps under the EBM of iteration {it}"
                 + (f", until their mean energy reaches the saved bank's {target:.5g}" if target is not None else ""))
        steps = reburn(self.bank, self.ebm, cfg, cfg.reburn_steps, it, self.device, cfg.reburn_chunk, target,
                       cfg.reburn_check, on_chunk=lambda done, n: self.log(
                           f"re-burn: {done}/{len(self.bank)} chains, {n} steps, {time.monotonic() - t:.1f} s"))
        self.record["reburn"] = {"steps": steps, "max_steps": cfg.reburn_steps, "target": target,
                                 "chains": len(self.bank), "init": cfg.bank_init, "seconds": time.monotonic() - t,
                                 "energy_before": saved[-1] if saved else None,
                                 "energy_after": energy_stats(self.ebm, self.bank.states, self.device, 1000)}

    def run(self, iterations: int, deadline: float = float("inf"), show: bool = True, name: str = "train-ebm") -> dict:
        """Train to `iterations`, or until the next iteration and the final save would pass `deadline`
        (time.monotonic()); checkpoints every `checkpoint_every` iterations and at the end."""
        loop, start_it, t_train = self.ebm_iteration, self.iteration, time.monotonic()
        bar = Progress(iterations, name, start=start_it, enabled=show, every=20.0 if self.card else 60.0)
        pace = {"per_it": 0.0, "save": 15.0 if self.out else 0.0}

        def on_step(m):
            pace["per_it"] = m["step_seconds"] if not pace["per_it"] else 0.9 * pace["per_it"] + 0.1 * m["step_seconds"]
            left = {"left": f"{max(deadline - time.monotonic(), 0) / 60:.1f}min"} if deadline < float("inf") else {}
            bar.update(1, energy_diff=m["energy_diff"], phase=loop.phase, chain_bank_update=time_split(m), **left)

        def stop() -> bool:
            if time.monotonic() + 2 * pace["per_it"] + pace["save"] > deadline:
                self.log(f"stopping at iteration {loop.iteration}: the --minutes budget is spent")
                return True
            return False

        def on_log(t, means, m):
            self.history["iteration"].append(t)
            for k in METRICS:
                self.history[k].append(means[k])

        def on_save(t):
            if self.out is not None:
                began = time.monotonic()
                self.save(t - start_it, began - t_train)
                pace["save"] = 1.5 * (time.monotonic() - began) + 2.0

        try:
            run_ebm(loop, iterations, log_every=self.cfg.log_every, checkpoint_every=self.cfg.checkpoint_every,
                    on_log=on_log, on_save=on_save, on_step=on_step, stop=stop)
        finally:
            bar.close()
        if self.out is not None and self.saved_at != loop.iteration:  # stopped by the deadline
            self.save(loop.iteration - start_it, time.monotonic() - t_train)
        return self.record

    def save(self, trained: int, train_seconds: float) -> None:
        """The checkpoint (and the bank, the sample grid and the card, as asked) into `out`, each file atomically."""
        it = self.saved_at = self.iteration
        self.history["bank_energy"].append({"iteration": it,
                                            **energy_stats(self.ebm, self.bank.states, self.device, 1000)})
        self.record.update(end_iteration=it, seconds=time.monotonic() - self.t0, train_seconds=train_seconds,
                           iterations_per_second=trained / train_seconds if trained else None)
        if self.card:
            grid = f"samples-s{self.record['session']:02d}.png"
            rows = torch.linspace(0, len(self.bank) - 1, min(GRID, len(self.bank))).round().long()
            storage.write_bytes(storage.join(self.out, grid), image_grid_png(self.bank.states[rows].numpy()))
            self.record["grid"] = grid
        if self.keep_bank:  # before ckpt.pt: a checkpoint never names a bank that is not there yet
            save_bank(self.bank, bank_part(self.out, 0))
        state = save_checkpoint(self.out, self.ebm, it, self.phase, self.optimizer, self.fingerprint,
                                to_yaml(self.cfg), self.history, [*self.sessions, dict(self.record)])
        if self.card:
            write_card(self.out, state)
            fs, path = storage.filesystem(storage.join(self.out, CKPT))
            self.log(f"saved iteration {it}: {storage.join(self.out, CKPT)} ({fs.size(path) / 2**20:.2f} MiB), "
                     f"{self.record['grid']}, curves.png, README.md")


def train_ebm(cfg: TrainEBMConfig, device: str = "cpu", data: ImageSet | None = None,
              show: bool = True) -> LocalTraining:
    """Train to cfg.iterations in this process, checkpointing (with the bank) to cfg.output; a rerun with the
    same output continues from the checkpoint found there, exactly."""
    data = data if data is not None else read_images(cfg.data)
    preflight_ebm(cfg, data, tracking=False)
    ckpt = storage.join(cfg.output, CKPT)
    state = load_checkpoint(ckpt) if storage.exists(ckpt) else None
    run = LocalTraining(cfg, data, cfg.output, device, state, cfg.output, keep_bank=True, log=lambda _: None)
    run.run(cfg.iterations, show=show)
    return run


def train_classifier(cfg: TrainClassifierConfig, device: str = "cpu", show: bool = True) -> dict:
    """Natural training (paper: SGD momentum 0.9, wd 2e-4, batch 100, lr 0.1 -> 0.01 -> 0.001), resumable per epoch."""
    data = read_images(cfg.data)
    test = read_images(cfg.test_data) if cfg.test_data is not None else None
    preflight_classifier(cfg, data, test, tracking=False)
    clf = new_classifier(cfg).to(device)
    opt, sched = classifier_optimizer(cfg, clf)
    epoch, history = load_classifier_training(cfg.output, clf, opt, sched)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    bar = Progress(cfg.epochs * steps_per_epoch, "train-classifier", start=epoch * steps_per_epoch, enabled=show)

    def on_epoch(epoch, history):
        save_classifier_training(cfg.output, cfg, epoch, clf, opt, sched, history)
        save_classifier(clf, storage.join(cfg.output, "classifier.pt"), epoch=epoch)

    run_classifier(cfg, clf, opt, sched, epoch, history, lambda r: (data.floats(r), data.labels[r]), len(data),
                   device=device, test=test, on_step=lambda m: bar.update(1, loss=m["loss"]), on_epoch=on_epoch)
    bar.close()
    return {"classifier": clf.eval(), "history": history}
