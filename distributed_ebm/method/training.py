"""Training, the method's part: the EBM iteration by maximum likelihood with a persistent bank, the one
loop that runs it, and natural classifier training (one epoch, one loop).

The EBM iteration (`EBMIteration`) and its loop (`run_ebm`) are what the single-process and one-GPU
entries (local/train.py) and every Ray Train worker (distributed/train.py) run; they pass in the bank
(in memory, or the replay-buffer actors), what a log line and a checkpoint do, and when to stop.
Plain PyTorch: settings are read from the config objects' fields, no config, I/O or Ray is imported.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, JobFailed
from .bank import ImageBank
from .langevin import langevin, prepare_energy
from .nets import EBM, build_classifier
from .noise import ChainKeys
from .precision import PRECISIONS


class TrainingDiverged(JobFailed):
    """The loss stopped being finite; the last good checkpoint is left as it was (one line, exit 1)."""


def ebm_loss(ebm: nn.Module, positives: torch.Tensor, negatives: torch.Tensor, temperature: float):
    """(loss, mean f(pos), mean f(neg)): loss = (mean f(pos) - mean f(neg)) / temperature, temperature = sigma^2 / 2.

    One forward over both halves, so a DDP-wrapped EBM sees one forward per backward.
    """
    f = ebm(torch.cat([positives, negatives]))
    f_pos, f_neg = f[:len(positives)].mean(), f[len(positives):].mean()
    return (f_pos - f_neg) / temperature, f_pos, f_neg


def diverged(loss, f_pos, f_neg, grad_norm) -> TrainingDiverged:
    return TrainingDiverged(f"EBM loss is {loss.item()}, gradient norm {grad_norm.item():.4g} (energy of positives "
                            f"{f_pos.item():.4g}, negatives {f_neg.item():.4g}); stopped before the update")


def ebm_update(ebm: nn.Module, optimizer: torch.optim.Optimizer, positives: torch.Tensor, negatives: torch.Tensor,
               temperature: float, all_finite=lambda finite: finite) -> dict:
    """One maximum-likelihood step; raises TrainingDiverged, before stepping, on a non-finite loss or gradient.

    `all_finite` makes data-parallel workers agree on finiteness, so all of them stop or none.
    """
    loss, f_pos, f_neg = ebm_loss(ebm, positives, negatives, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in ebm.parameters() if p.grad is not None))
    if not all_finite(bool(torch.isfinite(loss) and torch.isfinite(grad_norm))):
        raise diverged(loss, f_pos, f_neg, grad_norm)
    optimizer.step()
    return {"energy_diff": (f_pos - f_neg).item(), "energy_pos": f_pos.item(), "energy_neg": f_neg.item(),
            "loss": loss.item(), "grad_norm": grad_norm.item()}


def make_ebm_optimizer(ebm: nn.Module, cfg, phase: str) -> torch.optim.Optimizer:
    """Adam (paper: lr 1e-4), then plain SGD with lr = sgd_lr * sigma^2 / 2 (no momentum)."""
    if phase == "adam":
        return torch.optim.Adam(ebm.parameters(), lr=cfg.adam_lr)
    return torch.optim.SGD(ebm.parameters(), lr=cfg.sgd_lr * temperature(cfg))


def temperature(cfg) -> float:
    return cfg.langevin.noise ** 2 / 2


def phase_at(cfg, iteration: int) -> str:
    return "adam" if iteration < cfg.sgd_start else "sgd"


def new_ebm(cfg) -> EBM:
    """The EBM at iteration 0: weights drawn from the run seed (global RNG untouched), sampler layout."""
    e = cfg.ebm
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return prepare_energy(EBM(e.width, e.image_size, e.channels, e.activation, e.soft_alpha, e.soft_eps))


@dataclass
class Draws:
    """What iteration t uses, the same on every worker: chains, restarts, data rows, data noise."""

    slots: torch.Tensor
    restart: torch.Tensor
    rows: torch.Tensor
    noise: torch.Tensor

    def part(self, rank: int, world: int) -> "Draws":
        b = len(self.slots) // world
        s = slice(rank * b, (rank + 1) * b)
        return Draws(self.slots[s], self.restart[s], self.rows[s], self.noise[s])


def iteration_draws(cfg, iteration: int, bank_size: int, data_size: int, shape) -> Draws:
    """Iteration t's random choices from (seed, t) alone: any worker count and any resume agree."""
    g = torch.Generator().manual_seed((cfg.seed << 32) | iteration)
    b = cfg.batch_size
    slots = torch.randperm(bank_size, generator=g)[:b]
    restart = torch.rand(b, generator=g) < cfg.rejuvenation
    rows = torch.randint(data_size, (b,), generator=g)
    noise = cfg.data_noise * torch.randn((b, *shape), generator=g)
    return Draws(slots, restart, rows, noise)


class LocalBank:
    """An in-process `ImageBank` behind the bank actors' calls (`lease`, `give_back`), so `EBMIteration`
    runs the same code against either."""

    def __init__(self, bank: ImageBank):
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank)

    def lease(self, slots: torch.Tensor, restart: torch.Tensor, call: int, holder: int = 0):
        return self.bank.read(slots, restart, call), self.bank.steps[slots - self.bank.offset].clone()

    def give_back(self, slots, states, steps_taken: int, restart, holder: int = 0) -> None:
        self.bank.write(slots, states, steps_taken, restart)


class EBMIteration:
    """The paper's training iteration on one worker's share of the batch: the one implementation that the
    single-process loop, the standalone (GPU) entry and every Ray Train worker run.

    Iteration t leases its chains from `bank` (an `ImageBank` via `LocalBank`, or the Ray bank actors),
    advances them K Langevin steps, gives them back, and takes one step of `optimizer` on `model` (the EBM,
    or its DDP wrapper) with positives `images(rows)` (float32 in [-1, 1] on `device`, made there from the
    uint8 pixels) + data noise; Adam becomes SGD at `sgd_start`.
    """

    def __init__(self, cfg, model: nn.Module, bank, images, data_size: int, shape, bank_size: int,
                 rank: int = 0, world: int = 1, device: str | torch.device = "cpu",
                 all_finite=lambda finite: finite):
        self.cfg, self.model, self.bank, self.images = cfg, model, bank, images
        self.sampler = model.module if hasattr(model, "module") else model  # the chains need no DDP
        self.data_size, self.shape, self.bank_size = data_size, tuple(shape), bank_size
        self.rank, self.world, self.device, self.all_finite = rank, world, torch.device(device), all_finite
        self.positives = None
        self.resume(0, phase_at(cfg, 0))

    def resume(self, iteration: int, phase: str, optimizer_state: dict | None = None) -> None:
        """Continue at `iteration` in `phase` (the optimizer rebuilt, then a copy of its saved state loaded:
        torch's optimizers keep the given tensors and update them in place)."""
        self.iteration, self.phase = iteration, phase
        self.optimizer = make_ebm_optimizer(self.model, self.cfg, phase)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))

    def step(self) -> dict:
        cfg, lv, t = self.cfg, self.cfg.langevin, self.iteration
        t0 = time.time()
        if phase_at(cfg, t) != self.phase:
            self.resume(t, phase_at(cfg, t))
        d = iteration_draws(cfg, t, self.bank_size, self.data_size, self.shape).part(self.rank, self.world)
        tb = time.time()
        start, age = self.bank.lease(d.slots, d.restart, t, self.rank)
        bank_seconds = time.time() - tb
        keys = ChainKeys(cfg.seed, d.slots, torch.zeros_like(d.slots), call=t)
        tc = time.time()
        negatives = langevin(self.sampler, start.to(self.device), keys, lv.steps, lv.step_size, lv.noise,
                             amp=PRECISIONS[cfg.precision].amp)
        if self.device.type == "cuda":  # the chain's own time, not the bank's wait for it
            torch.cuda.synchronize(self.device)
        tb = time.time()
        chain_seconds = tb - tc
        self.bank.give_back(d.slots, negatives, lv.steps, d.restart, self.rank)
        tu = time.time()
        bank_seconds += tu - tb
        # the images travel as uint8 and become floats on the device (`images`), where the noise joins them
        positives = (self.images(d.rows) + d.noise.to(self.device)).contiguous(memory_format=torch.channels_last)
        metrics = ebm_update(self.model, self.optimizer, positives, negatives, temperature(cfg), self.all_finite)
        self.iteration, self.positives = t + 1, positives
        end = time.time()
        return {**metrics, "bank_age": age.float().mean().item(), "bank_seconds": bank_seconds,
                "chain_seconds": chain_seconds, "update_seconds": end - tu,  # the update: data, DDP all-reduce, step
                "step_seconds": end - t0, "lr": self.optimizer.param_groups[0]["lr"]}


def check_sizes(cfg, data_size: int) -> None:
    """Fail early, naming the field, on sizes that cannot train with these data (the config itself
    checks that batch_size splits over ray.workers)."""
    if temperature(cfg) <= 0:
        raise InputError("langevin.noise must be > 0 for training: the loss is scaled by noise^2 / 2")
    if data_size < cfg.batch_size:
        raise InputError(f"batch_size = {cfg.batch_size} but the training data hold only {data_size} images")
    size = cfg.bank_size or data_size
    if size < cfg.batch_size:
        raise InputError(f"bank_size = {size} is smaller than batch_size = {cfg.batch_size}")


# The iteration's metrics that a log line averages over its window, in every entry
METRICS = ("energy_diff", "energy_pos", "energy_neg", "loss", "grad_norm", "bank_age", "bank_seconds", "chain_seconds",
           "update_seconds", "step_seconds")


def time_split(metrics: dict) -> str:
    """Where an iteration's time goes, for a progress line: chains, bank (lease and return), update (data, DDP
    all-reduce, optimizer step), as shares of the step."""
    step = max(metrics["step_seconds"], 1e-12)
    return "/".join(f"{100 * metrics[k] / step:.0f}" for k in ("chain_seconds", "bank_seconds", "update_seconds")) + "%"


class MetricWindow:
    """The mean of each of `METRICS` over the iterations since the last `take`."""

    def __init__(self):
        self.sums, self.count, self.t0 = dict.fromkeys(METRICS, 0.0), 0, time.time()

    def add(self, metrics: dict) -> None:
        for k in METRICS:
            self.sums[k] += metrics[k]
        self.count += 1

    def take(self, reduce: Callable[[list[float]], list[float]] | None = None) -> dict:
        """The window's means (`reduce`: over data-parallel workers too) and its rate; starts a new window."""
        means = [self.sums[k] / self.count for k in METRICS]
        out = dict(zip(METRICS, reduce(means) if reduce else means))
        out["iterations_per_second"] = self.count / max(time.time() - self.t0, 1e-9)
        self.__init__()
        return out


def run_ebm(loop: EBMIteration, until: int, *, log_every: int, checkpoint_every: int,
            on_log: Callable[[int, dict, dict], None] | None = None, on_save: Callable[[int], None] | None = None,
            on_step: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None,
            reduce: Callable[[list[float]], list[float]] | None = None) -> bool:
    """The EBM run loop of every entry: `loop.step()` until iteration `until`, or until `stop()` says so
    before an iteration. After iteration t: `on_step(metrics)`; at a checkpoint (every `checkpoint_every`
    and at `until`) or every `log_every`, `on_log(t, window means, metrics)`; then at a checkpoint `on_save(t)`.
    Returns whether it reached `until`; a non-finite loss raises TrainingDiverged before its update."""
    window = MetricWindow()
    while loop.iteration < until:
        if stop is not None and stop():
            return False
        metrics = loop.step()
        window.add(metrics)
        t = loop.iteration
        if on_step is not None:
            on_step(metrics)
        save = t % checkpoint_every == 0 or t == until
        if save or t % log_every == 0:
            means = window.take(reduce)
            if on_log is not None:
                on_log(t, means, metrics)
        if save and on_save is not None:
            on_save(t)
    return True


# --- classifiers -----------------------------------------------------------------------------

def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero-padded, i.e. black = -1) and horizontal flip, per image."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out.contiguous()


def classifier_update(clf: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                      labels: torch.Tensor) -> dict:
    logits = clf(images)
    loss = F.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"classifier loss is {loss.item()}; stopping before the update")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}


@torch.no_grad()
def accuracy(clf: nn.Module, data, batch_size: int = 500, device="cpu") -> float:
    clf.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(data)))
        correct += (clf(data.floats(rows, device)).argmax(1).cpu() == data.labels[rows]).sum().item()
    return correct / len(data)


def new_classifier(cfg):
    """The classifier at epoch 0, weights drawn from the run seed (global RNG untouched)."""
    c = cfg.classifier
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return build_classifier(c.arch, c.num_classes, c.mean, c.std, c.wrn_depth, c.wrn_widen)


def classifier_optimizer(cfg, model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, cfg.lr_milestones, cfg.lr_gamma)


def epoch_batches(cfg, epoch: int, n: int, rank: int = 0, world: int = 1):
    """Yield (rows, augmentation generator) of this worker's share of each batch of the epoch.

    The order comes from (seed, epoch) and each share's augmentation from (seed, epoch, batch, rank),
    so a resumed run repeats an uninterrupted one.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed((cfg.seed << 32) | epoch))
    for b, i in enumerate(range(0, n, cfg.batch_size)):
        rows = order[i:i + cfg.batch_size].tensor_split(world)[rank]
        yield rows, torch.Generator().manual_seed(hash((cfg.seed, epoch, b, rank)) & 0x7FFFFFFFFFFFFFFF)


def classifier_epoch(cfg, model, opt, batch, epoch: int, rank: int = 0, world: int = 1,
                     n: int = 0, on_step=None, device="cpu") -> dict:
    """One epoch of natural training; `batch(rows)` gives (images in [-1, 1], labels)."""
    model.train()
    losses, t0 = [], time.time()
    for rows, g in epoch_batches(cfg, epoch, n, rank, world):
        x, y = batch(rows)
        x = augment(x, g) if cfg.augment else x
        m = classifier_update(model, opt, x.to(device), y.to(device))
        losses.append(m["loss"])
        if on_step:
            on_step(m)
    return {"epoch": epoch + 1, "train_loss": sum(losses) / max(len(losses), 1), "seconds": time.time() - t0}


def run_classifier(cfg, model: nn.Module, optimizer, scheduler, epoch: int, history: list, batch, n: int, *,
                   rank: int = 0, world: int = 1, device="cpu", test=None, classifier: nn.Module | None = None,
                   on_step=None, on_epoch: Callable[[int, list], None] | None = None,
                   reduce: Callable[[list[float]], list[float]] | None = None) -> list:
    """The classifier's run loop of every entry: epochs from `epoch` to `cfg.epochs`, each followed by the
    schedule's step, the test accuracy of `classifier` (the unwrapped model) on `test` where given, a row in
    `history` and `on_epoch(epoch, history)` (the checkpoint). `reduce` averages the loss over workers."""
    classifier = classifier if classifier is not None else model
    while epoch < cfg.epochs:
        row = classifier_epoch(cfg, model, optimizer, batch, epoch, rank, world, n, on_step, device)
        scheduler.step()
        epoch += 1
        if reduce is not None:
            row["train_loss"] = reduce([row["train_loss"]])[0]
        row["test_accuracy"] = accuracy(classifier, test, device=device) if test is not None else None
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, history)
    return history
