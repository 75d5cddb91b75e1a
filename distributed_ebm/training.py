"""Single-process training: the EBM by maximum likelihood with a persistent bank, and natural classifiers.

The update functions (`ebm_update`, `classifier_update`) are what the Ray Train workers call too;
the loops here add data, checkpoints (resumable: a rerun with the same output continues) and
progress around them.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import storage
from .bank import ImageBank
from .config import TrainClassifierConfig, TrainEBMConfig, to_yaml
from .data import ImageSet, load
from .langevin import langevin, prepare_energy
from .nets import EBM, build_classifier, save_classifier, save_ebm
from .noise import ChainKeys
from .progress import Progress


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is left as it was."""


def ebm_update(ebm: nn.Module, optimizer: torch.optim.Optimizer, positives: torch.Tensor, negatives: torch.Tensor,
               temperature: float) -> dict:
    """One maximum-likelihood step: minimize (mean f(pos) - mean f(neg)) / temperature, temperature = sigma^2 / 2."""
    f_pos, f_neg = ebm(positives).mean(), ebm(negatives).mean()
    loss = (f_pos - f_neg) / temperature
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"EBM loss is {loss.item()} (energy of positives {f_pos.item():.4g}, "
                               f"negatives {f_neg.item():.4g}); stopping before the update")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in ebm.parameters() if p.grad is not None))
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


class EBMTraining:
    """The paper's loop in one process: draw chains from the bank, K Langevin steps, write back, update."""

    def __init__(self, cfg: TrainEBMConfig, data: ImageSet, device: str | torch.device = "cpu"):
        if temperature(cfg) <= 0:
            raise ValueError("langevin.noise must be > 0 for training: the loss is scaled by noise^2 / 2")
        if len(data) < cfg.batch_size:
            raise ValueError(f"batch_size = {cfg.batch_size} but the training data hold only {len(data)} images")
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        e = cfg.ebm
        with torch.random.fork_rng():  # weights from the run seed, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.ebm = prepare_energy(EBM(e.width, e.image_size, e.channels).to(self.device))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        size = cfg.bank_size or len(data)
        if size < cfg.batch_size:
            raise ValueError(f"bank_size = {size} is smaller than batch_size = {cfg.batch_size}")
        self.bank = ImageBank(size, tuple(data.images.shape[1:]), cfg.bank_init, data.images, self.generator)
        self.iteration = 0
        self.phase = self._phase_at(0)
        self.optimizer = make_ebm_optimizer(self.ebm, cfg, self.phase)

    def _phase_at(self, iteration: int) -> str:
        return "adam" if iteration < self.cfg.sgd_start else "sgd"

    def step(self) -> dict:
        cfg, g = self.cfg, self.generator
        if self._phase_at(self.iteration) != self.phase:
            self.phase = self._phase_at(self.iteration)
            self.optimizer = make_ebm_optimizer(self.ebm, cfg, self.phase)
        slots = self.bank.draw(cfg.batch_size, g)
        start = self.bank.read(slots, cfg.rejuvenation, g).to(self.device)
        age = self.bank.steps[slots].float().mean().item()
        keys = ChainKeys(cfg.seed, slots, torch.zeros_like(slots), call=self.iteration)
        lv = cfg.langevin
        negatives = langevin(self.ebm, start, keys, lv.steps, lv.step_size, lv.noise)
        pick = torch.randint(len(self.data), (cfg.batch_size,), generator=g)
        positives = self.data.images[pick]
        positives = (positives + cfg.data_noise * torch.randn(positives.shape, generator=g)).to(self.device)
        metrics = ebm_update(self.ebm, self.optimizer, positives.contiguous(memory_format=torch.channels_last),
                             negatives, temperature(cfg))
        self.bank.write(slots, negatives, lv.steps)
        self.iteration += 1
        return {**metrics, "bank_age": age, "lr": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self) -> dict:
        return {"kind": "ebm_training", "iteration": self.iteration, "phase": self.phase,
                "ebm": self.ebm.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "bank": self.bank.state_dict(),
                "config": to_yaml(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.ebm.load_state_dict(state["ebm"])
        self.iteration, self.phase = state["iteration"], state["phase"]
        self.optimizer = make_ebm_optimizer(self.ebm, self.cfg, self.phase)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.bank.load_state_dict(state["bank"])


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
        correct += (clf(data.images[i:i + batch_size].to(device)).argmax(1).cpu() == data.labels[i:i + batch_size]).sum().item()
    return correct / len(data)


def train_classifier(cfg: TrainClassifierConfig, device: str = "cpu", show: bool = True) -> dict:
    """Natural training (paper: SGD momentum 0.9, wd 2e-4, batch 100, lr 0.1 -> 0.01 -> 0.001), resumable per epoch."""
    data = load(cfg.data)
    test = load(cfg.test_data) if cfg.test_data is not None else None
    c = cfg.classifier
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        clf = build_classifier(c.arch, c.num_classes, c.mean, c.std, c.wrn_depth, c.wrn_widen).to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.lr_milestones, cfg.lr_gamma)
    g = torch.Generator().manual_seed(cfg.seed)
    epoch, history = 0, []
    ckpt = storage.join(cfg.output, "checkpoint.pt")
    if storage.exists(ckpt):
        state = storage.load_torch(ckpt)
        clf.load_state_dict(state["classifier"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g.set_state(state["generator"])
        epoch, history = state["epoch"], state["history"]
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    bar = Progress(cfg.epochs * steps_per_epoch, "train-classifier", start=epoch * steps_per_epoch, enabled=show)
    while epoch < cfg.epochs:
        clf.train()
        t0 = time.time()
        order = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), cfg.batch_size):
            rows = order[i:i + cfg.batch_size]
            x = augment(data.images[rows], g) if cfg.augment else data.images[rows]
            m = classifier_update(clf, opt, x.to(device), data.labels[rows].to(device))
            bar.update(1, loss=m["loss"], epoch=epoch)
        sched.step()
        epoch += 1
        history.append({"epoch": epoch, "train_loss": m["loss"], "seconds": time.time() - t0,
                        "test_accuracy": accuracy(clf, test, device=device) if test is not None else None})
        storage.save_torch({"kind": "classifier_training", "epoch": epoch, "classifier": clf.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "generator": g.get_state(), "history": history, "config": to_yaml(cfg)}, ckpt)
        save_classifier(clf, storage.join(cfg.output, "classifier.pt"), epoch=epoch)
    bar.close()
    return {"classifier": clf.eval(), "history": history}
