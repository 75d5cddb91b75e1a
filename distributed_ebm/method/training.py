"""Single-process training: the EBM by maximum likelihood with a persistent bank, and natural classifiers.

The EBM iteration (`EBMIteration`) and `classifier_update` are what the Ray Train workers and the
standalone GPU entry run too; the loops here add data, checkpoints (resumable: a rerun with the same
output continues) and progress around them.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..store import storage
from .bank import ImageBank
from ..config import InputError, JobFailed, TrainClassifierConfig, TrainEBMConfig, to_yaml
from ..store.data import ImageSet, load
from .langevin import cuda_defaults, langevin, prepare_energy
from .nets import EBM, build_classifier, save_classifier, save_ebm
from .noise import ChainKeys
from ..store.progress import Progress


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


def make_ebm_optimizer(ebm: nn.Module, cfg: TrainEBMConfig, phase: str) -> torch.optim.Optimizer:
    """Adam (paper: lr 1e-4), then plain SGD with lr = sgd_lr * sigma^2 / 2 (no momentum)."""
    if phase == "adam":
        return torch.optim.Adam(ebm.parameters(), lr=cfg.adam_lr)
    return torch.optim.SGD(ebm.parameters(), lr=cfg.sgd_lr * temperature(cfg))


def temperature(cfg: TrainEBMConfig) -> float:
    return cfg.langevin.noise ** 2 / 2


def phase_at(cfg: TrainEBMConfig, iteration: int) -> str:
    return "adam" if iteration < cfg.sgd_start else "sgd"


def new_ebm(cfg: TrainEBMConfig) -> EBM:
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


def iteration_draws(cfg: TrainEBMConfig, iteration: int, bank_size: int, data_size: int, shape) -> Draws:
    """Iteration t's random choices from (seed, t) alone: any worker count and any resume agree."""
    g = torch.Generator().manual_seed((cfg.seed << 32) | iteration)
    b = cfg.batch_size
    slots = torch.randperm(bank_size, generator=g)[:b]
    restart = torch.rand(b, generator=g) < cfg.rejuvenation
    rows = torch.randint(data_size, (b,), generator=g)
    noise = cfg.data_noise * torch.randn((b, *shape), generator=g)
    return Draws(slots, restart, rows, noise)


def training_state(iteration: int, phase: str, ebm: nn.Module, optimizer, cfg) -> dict:
    return {"kind": "ebm_training", "iteration": iteration, "phase": phase, "ebm": ebm.state_dict(),
            "optimizer": optimizer.state_dict(), "config": to_yaml(cfg)}


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

    def __init__(self, cfg: TrainEBMConfig, model: nn.Module, bank, images, data_size: int, shape, bank_size: int,
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
        negatives = langevin(self.sampler, start.to(self.device), keys, lv.steps, lv.step_size, lv.noise)
        tb = time.time()
        self.bank.give_back(d.slots, negatives, lv.steps, d.restart, self.rank)
        bank_seconds += time.time() - tb
        # the images travel as uint8 and become floats on the device (`images`), where the noise joins them
        positives = (self.images(d.rows) + d.noise.to(self.device)).contiguous(memory_format=torch.channels_last)
        metrics = ebm_update(self.model, self.optimizer, positives, negatives, temperature(cfg), self.all_finite)
        self.iteration, self.positives = t + 1, positives
        return {**metrics, "bank_age": age.float().mean().item(), "bank_seconds": bank_seconds,
                "step_seconds": time.time() - t0, "lr": self.optimizer.param_groups[0]["lr"]}


class EBMTraining:
    """The paper's loop in one process: `EBMIteration` on the whole batch with the bank in memory."""

    def __init__(self, cfg: TrainEBMConfig, data: ImageSet, device: str | torch.device = "cpu"):
        check_sizes(cfg, len(data))
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        cuda_defaults(self.device)
        self.ebm = new_ebm(cfg).to(self.device)
        size = cfg.bank_size or len(data)
        self.bank = ImageBank(size, tuple(data.data.shape[1:]), cfg.bank_init, cfg.seed, data.data)
        self.loop = EBMIteration(cfg, self.ebm, LocalBank(self.bank), lambda rows: data.floats(rows, self.device),
                                 len(data), data.data.shape[1:], size, device=self.device)

    iteration = property(lambda self: self.loop.iteration)
    phase = property(lambda self: self.loop.phase)
    optimizer = property(lambda self: self.loop.optimizer)

    def step(self) -> dict:
        return self.loop.step()

    def state_dict(self) -> dict:
        return {**training_state(self.iteration, self.phase, self.ebm, self.optimizer, self.cfg),
                "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ebm.load_state_dict(state["ebm"])
        self.loop.resume(state["iteration"], state["phase"], state["optimizer"])
        self.bank.load_state_dict(state["bank"])


def check_sizes(cfg: TrainEBMConfig, data_size: int) -> None:
    """Fail early, naming the field, on sizes that cannot train with these data (the config itself
    checks that batch_size splits over ray.workers)."""
    if temperature(cfg) <= 0:
        raise InputError("langevin.noise must be > 0 for training: the loss is scaled by noise^2 / 2")
    if data_size < cfg.batch_size:
        raise InputError(f"batch_size = {cfg.batch_size} but the training data hold only {data_size} images")
    size = cfg.bank_size or data_size
    if size < cfg.batch_size:
        raise InputError(f"bank_size = {size} is smaller than batch_size = {cfg.batch_size}")


def train_ebm(cfg: TrainEBMConfig, device: str = "cpu", data: ImageSet | None = None, show: bool = True) -> EBMTraining:
    """Train to cfg.iterations, checkpointing to cfg.output; resumes from a checkpoint found there."""
    data = data if data is not None else load(cfg.data)
    run = EBMTraining(cfg, data, device)
    ckpt = storage.join(cfg.output, "checkpoint.pt")
    if storage.exists(ckpt):
        run.load_state_dict(storage.load_torch(ckpt))
    bar = Progress(cfg.iterations, "train-ebm", start=run.iteration, enabled=show)
    while run.iteration < cfg.iterations:
        metrics = run.step()
        bar.update(1, energy_diff=metrics["energy_diff"], phase=run.phase)
        if run.iteration % cfg.checkpoint_every == 0 or run.iteration == cfg.iterations:
            storage.save_torch(run.state_dict(), ckpt)
            save_ebm(run.ebm, storage.join(cfg.output, "ebm.pt"), iteration=run.iteration)
    bar.close()
    return run


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


def classifier_update(clf: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> dict:
    logits = clf(images)
    loss = F.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"classifier loss is {loss.item()}; stopping before the update")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "accuracy": (logits.argmax(1) == labels).float().mean().item()}


@torch.no_grad()
def accuracy(clf: nn.Module, data: ImageSet, batch_size: int = 500, device="cpu") -> float:
    clf.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        rows = torch.arange(i, min(i + batch_size, len(data)))
        correct += (clf(data.floats(rows, device)).argmax(1).cpu() == data.labels[rows]).sum().item()
    return correct / len(data)


def new_classifier(cfg: TrainClassifierConfig):
    """The classifier at epoch 0, weights drawn from the run seed (global RNG untouched)."""
    c = cfg.classifier
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return build_classifier(c.arch, c.num_classes, c.mean, c.std, c.wrn_depth, c.wrn_widen)


def classifier_optimizer(cfg: TrainClassifierConfig, model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, cfg.lr_milestones, cfg.lr_gamma)


def epoch_batches(cfg: TrainClassifierConfig, epoch: int, n: int, rank: int = 0, world: int = 1):
    """Yield (rows, augmentation generator) of this worker's share of each batch of the epoch.

    The order comes from (seed, epoch) and each share's augmentation from (seed, epoch, batch, rank),
    so a resumed run repeats an uninterrupted one.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed((cfg.seed << 32) | epoch))
    for b, i in enumerate(range(0, n, cfg.batch_size)):
        rows = order[i:i + cfg.batch_size].tensor_split(world)[rank]
        yield rows, torch.Generator().manual_seed(hash((cfg.seed, epoch, b, rank)) & 0x7FFFFFFFFFFFFFFF)


def classifier_epoch(cfg: TrainClassifierConfig, model, opt, batch, epoch: int, rank: int = 0, world: int = 1,
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


def classifier_state(cfg, epoch: int, clf, opt, sched, history: list) -> dict:
    return {"kind": "classifier_training", "epoch": epoch, "classifier": clf.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "history": history, "config": to_yaml(cfg)}


def train_classifier(cfg: TrainClassifierConfig, device: str = "cpu", show: bool = True) -> dict:
    """Natural training (paper: SGD momentum 0.9, wd 2e-4, batch 100, lr 0.1 -> 0.01 -> 0.001), resumable per epoch."""
    data = load(cfg.data)
    test = load(cfg.test_data) if cfg.test_data is not None else None
    clf = new_classifier(cfg).to(device)
    opt, sched = classifier_optimizer(cfg, clf)
    epoch, history = 0, []
    ckpt = storage.join(cfg.output, "checkpoint.pt")
    if storage.exists(ckpt):
        state = storage.load_torch(ckpt)
        clf.load_state_dict(state["classifier"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        epoch, history = state["epoch"], state["history"]
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    bar = Progress(cfg.epochs * steps_per_epoch, "train-classifier", start=epoch * steps_per_epoch, enabled=show)
    while epoch < cfg.epochs:
        row = classifier_epoch(cfg, clf, opt, lambda r: (data.floats(r), data.labels[r]), epoch, n=len(data),
                               on_step=lambda m: bar.update(1, loss=m["loss"]), device=device)
        sched.step()
        epoch += 1
        history.append({**row, "test_accuracy": accuracy(clf, test, device=device) if test is not None else None})
        storage.save_torch(classifier_state(cfg, epoch, clf, opt, sched, history), ckpt)
        save_classifier(clf, storage.join(cfg.output, "classifier.pt"), epoch=epoch)
    bar.close()
    return {"classifier": clf.eval(), "history": history}
