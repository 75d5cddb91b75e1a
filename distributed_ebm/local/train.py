"""Train the EBM in one process on one device within a wall-clock budget, resumable across machines.

For the lent GPU machines (no Ray, MLflow or s3fs there; ../shared/STACK.md): each session runs the
same iteration as the Ray trainer (`training.EBMIteration`) for `--minutes`, then leaves in `--out` a
compact checkpoint (`store/checkpoints.py`, about 8 MB for the paper's EBM), a sample grid of the bank, the loss
and energy curves and the model card. The next session, on any machine, continues from that
checkpoint with `--resume`: the bank, which cannot travel, is re-burned first.

    python3 jobs/train_ebm_gpu.py --config jobs/configs/train_ebm_cifar10.yaml --minutes 8 \\
        [--resume models/ebm-cifar10-gpu/ckpt.pt] --out DIR [key=value ...]
    python3 jobs/train_ebm_gpu.py --card models/ebm-cifar10-gpu     (rewrite the card from its ckpt.pt)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time

import torch
from pydantic import Field

from ..store import storage
from ..method.bank import ImageBank
from ..results.card import write_card
from ..store.checkpoints import check_fingerprint, data_fingerprint, energy_stats, load_compact, reburn, save_compact, settings_fingerprint
from ..config import InputError, TrainEBMConfig, exit_status, load_config, to_yaml
from ..store.data import ImageSet, load
from ..method.langevin import cuda_defaults
from ..store.progress import Progress
from ..results.report import image_grid_png
from ..method.training import EBMIteration, LocalBank, TrainingDiverged, check_sizes, new_ebm

CKPT = "ckpt.pt"
HISTORY_KEYS = ("loss", "energy_diff", "energy_pos", "energy_neg", "grad_norm", "bank_age", "step_seconds")
GRID = 64  # bank chains in each session's sample grid


class StandaloneTrainConfig(TrainEBMConfig):
    """The training config plus the re-burn (its `ray` and `mlflow` sections are read and unused)."""

    reburn_steps: int = Field(500, ge=0, le=1_000_000,
                              description="Langevin steps that rebuild the bank on resume (the most, with reburn_match)")
    reburn_match: bool = Field(True, description="stop the re-burn once the chains' mean energy reaches the bank's "
                                                 "at the last save (checked every reburn_check steps)")
    reburn_check: int = Field(10, ge=1, le=100_000)
    reburn_chunk: int = Field(10_000, ge=1, le=1_000_000, description="chains per batch of the re-burn")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Session:
    """One session of training: build or resume, re-burn, train until the deadline, save."""

    def __init__(self, cfg: StandaloneTrainConfig, data: ImageSet, out: str, device: torch.device,
                 resume: dict | None = None, minutes: float | None = None, log=print, started: float | None = None):
        check_sizes(cfg, len(data))
        self.cfg, self.data, self.out, self.device, self.log = cfg, data, out, device, log
        cuda_defaults(device)  # as every trainer: TF32 convolutions on CUDA
        self.fingerprint = {**settings_fingerprint(cfg), **data_fingerprint(data)}
        self.ebm = new_ebm(cfg).to(device)
        shape = tuple(data.data.shape[1:])
        self.bank = ImageBank(cfg.bank_size or len(data), shape, cfg.bank_init, cfg.seed, data.data)
        self.loop = EBMIteration(cfg, self.ebm, LocalBank(self.bank), lambda rows: data.floats(rows, device), len(data),
                                 shape, len(self.bank), device=device)
        self.history = {"iteration": [], **{k: [] for k in HISTORY_KEYS}, "bank_energy": []}
        self.sessions: list[dict] = []
        self.t0, self.saved_at = started or time.monotonic(), None  # the session's minutes count from t0
        self.record = {"session": 1, "start_iteration": 0, "end_iteration": 0, "device": device_name(device),
                       "torch": str(torch.__version__), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"), "minutes_budget": minutes, "seconds": 0.0, "train_seconds": 0.0,
                       "iterations_per_second": None, "reburn": None, "grid": None}
        if resume is not None:
            self._resume(resume)

    def _resume(self, state: dict) -> None:
        cfg, tr = self.cfg, state["training"]
        check_fingerprint(tr["fingerprint"], self.fingerprint, "the checkpoint")
        self.ebm.load_state_dict(state["state_dict"])
        self.loop.resume(state["iteration"], tr["phase"], tr["optimizer"])
        self.history, self.sessions = copy.deepcopy(tr["history"]), copy.deepcopy(tr["sessions"])
        self.record.update(session=len(self.sessions) + 1, start_iteration=state["iteration"],
                           end_iteration=state["iteration"])
        t, it = time.monotonic(), state["iteration"]
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

    def run(self, iterations: int, deadline: float = float("inf"), show: bool = True) -> dict:
        """Train to `iterations` or until the next iteration and the final save would pass `deadline`
        (time.monotonic()); saves every `checkpoint_every` iterations and at the end."""
        cfg, loop = self.cfg, self.loop
        bar = Progress(iterations, "train-ebm-gpu", start=loop.iteration, enabled=show, every=20.0)
        window = {k: 0.0 for k in HISTORY_KEYS}
        count, t_train, per_it, save_cost = 0, time.monotonic(), None, 15.0
        start_it = loop.iteration
        while loop.iteration < iterations:
            if time.monotonic() + 2 * (per_it or 0.0) + save_cost > deadline:
                self.log(f"stopping at iteration {loop.iteration}: the --minutes budget is spent")
                break
            m = loop.step()
            per_it = m["step_seconds"] if per_it is None else 0.9 * per_it + 0.1 * m["step_seconds"]
            for k in HISTORY_KEYS:
                window[k] += m[k]
            count += 1
            bar.update(1, energy_diff=m["energy_diff"], phase=loop.phase,
                       left=f"{max(deadline - time.monotonic(), 0) / 60:.1f}min" if deadline < float("inf") else "-")
            if loop.iteration % cfg.log_every == 0 or loop.iteration == iterations:
                self.history["iteration"].append(loop.iteration)
                for k in HISTORY_KEYS:
                    self.history[k].append(window[k] / count)
                window, count = {k: 0.0 for k in HISTORY_KEYS}, 0
            if loop.iteration % cfg.checkpoint_every == 0 and loop.iteration < iterations:
                t = time.monotonic()
                self.save(loop.iteration - start_it, t - t_train)
                save_cost = 1.5 * (time.monotonic() - t) + 2.0
        bar.close()
        if self.saved_at != loop.iteration:
            self.save(loop.iteration - start_it, time.monotonic() - t_train)
        return self.record

    def save(self, trained: int, train_seconds: float) -> None:
        """Checkpoint, this session's sample grid, curves and card into `out`, each file atomically."""
        it = self.saved_at = self.loop.iteration
        self.history["bank_energy"].append({"iteration": it, **energy_stats(self.ebm, self.bank.states, self.device, 1000)})
        grid = f"samples-s{self.record['session']:02d}.png"
        rows = torch.linspace(0, len(self.bank) - 1, min(GRID, len(self.bank))).round().long()
        storage.write_bytes(storage.join(self.out, grid), image_grid_png(self.bank.states[rows].numpy()))
        self.record.update(end_iteration=it, seconds=time.monotonic() - self.t0, train_seconds=train_seconds,
                           iterations_per_second=trained / train_seconds if trained else None, grid=grid)
        url = storage.join(self.out, CKPT)
        state = save_compact(url, self.ebm, it, self.loop.phase, self.loop.optimizer, self.fingerprint,
                             to_yaml(self.cfg), self.history, [*self.sessions, dict(self.record)])
        write_card(self.out, state)
        fs, path = storage.filesystem(url)
        self.log(f"saved iteration {it}: {url} ({fs.size(path) / 2**20:.2f} MiB), {grid}, curves.png, README.md")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_ebm_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="training YAML (e.g. jobs/configs/train_ebm_cifar10.yaml)")
    p.add_argument("--minutes", type=float, help="wall-clock budget of this session, from the start, saves included")
    p.add_argument("--resume", metavar="CKPT", help="a compact checkpoint to continue from (ckpt.pt)")
    p.add_argument("--out", metavar="DIR", help="where ckpt.pt, the sample grid, curves.png and README.md go")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--iterations", type=int, help="stop at this iteration (default: the config's `iterations`)")
    p.add_argument("--card", metavar="DIR", help="only rewrite DIR/README.md and DIR/curves.png from DIR/ckpt.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. reburn_steps=500")
    return p


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a torch device (cuda, cuda:N, cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parser().parse_args(argv)
    return exit_status("train_ebm_gpu", lambda: _main(args, started))


def _main(args: argparse.Namespace, started: float) -> int:
    if args.card:
        write_card(args.card, load_compact(storage.join(args.card, CKPT)))
        print(f"wrote {storage.join(args.card, 'README.md')}")
        return 0
    if args.minutes is None or not 0 < args.minutes <= 24 * 60:
        raise InputError(f"--minutes must be in (0, 1440] (got {args.minutes})")
    if not args.out:
        raise InputError("--out DIR is required (where the checkpoint and the card go)")
    cfg = load_config(StandaloneTrainConfig, args.config, args.overrides)
    iterations = cfg.iterations if args.iterations is None else args.iterations
    if not 1 <= iterations <= cfg.iterations:
        raise InputError(f"--iterations must be in [1, {cfg.iterations}] (got {iterations})")
    device = _device(args.device)
    state = None
    if args.resume:
        state = load_compact(args.resume)
        check_fingerprint(state["training"]["fingerprint"], settings_fingerprint(cfg), args.resume)
    data = load(cfg.data)
    print(f"train-ebm-gpu: {len(data)} images, {device_name(device)}, torch {torch.__version__}, "
          f"{args.minutes} min", flush=True)
    session = Session(cfg, data, args.out, device, state, args.minutes, lambda s: print(s, flush=True), started)
    try:
        record = session.run(iterations, started + 60 * args.minutes)
    except TrainingDiverged as err:
        raise TrainingDiverged(f"{err}; the last good checkpoint is the last one saved in {args.out}") from None
    rate = record["iterations_per_second"]
    print(f"session {record['session']}: iterations {record['start_iteration']} -> {record['end_iteration']} in "
          f"{record['seconds'] / 60:.2f} min on {record['device']} ({rate or 0:.3g} it/s); wrote {args.out}/", flush=True)
    return 0
