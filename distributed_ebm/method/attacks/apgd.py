"""How an attack moves from one iterate to the next: fixed-step PGD, or APGD's adaptive schedule.

APGD (Croce & Hein, "Reliable evaluation of adversarial robustness...", ICML 2020): step size
2 eps at first, momentum 0.75, and at checkpoints (after 22% of the steps, then ever shorter
periods, never under 6%) the step size of an image is halved and its iterate reset to its best
point so far when the loss rose in at most 75% of the steps since the last checkpoint, or when
neither its step size nor its best loss changed since then. Each image has its own schedule.

Both take (iterate, gradient, loss per image) and return the next iterate; `keep(mask)` drops the
images that left the batch; UPDATERS maps `attack.optimizer` to them. Their per-image state (and the
mask) lives on the images' device. With EOT the gradient and the loss are those of the EOT-averaged
output, as in AutoAttack's version for randomized defenses.
"""
from __future__ import annotations

import torch

from .pgd import ascent_step, project, to_signed_units


class FixedStep:
    """PGD: x + step_size * (sign of / normalized) gradient, projected."""

    def __init__(self, x_nat: torch.Tensor, norm: str, eps: float, step_size: float):
        self.x_nat, self.norm, self.eps, self.step_size = x_nat, norm, eps, step_size

    @classmethod
    def for_settings(cls, x_nat: torch.Tensor, s) -> "FixedStep":
        return cls(x_nat, s.norm, to_signed_units(s.eps), to_signed_units(s.step_size))

    def step(self, x: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor | None) -> torch.Tensor:
        return project(ascent_step(x, grad, self.norm, self.step_size), self.x_nat, self.norm, self.eps)

    def keep(self, mask: torch.Tensor) -> None:
        self.x_nat = self.x_nat[mask]


class APGD:
    """APGD's per-image step sizes, momentum and resets to the best point (see the module doc)."""

    RHO, MOMENTUM = 0.75, 0.75

    def __init__(self, x_nat: torch.Tensor, norm: str, eps: float, steps: int):
        n, like = x_nat.shape[0], dict(device=x_nat.device, dtype=x_nat.dtype)
        self.x_nat, self.norm, self.eps = x_nat, norm, eps
        self.eta = torch.full((n,), 2.0 * eps, **like)
        self.prev = self.best_x = self.best_grad = self.last_loss = None
        self.best_loss = torch.full((n,), float("-inf"), **like)
        self.best_at_check = torch.full((n,), float("-inf"), **like)
        self.reduced_last = torch.zeros(n, dtype=torch.bool, device=x_nat.device)
        self.increases = torch.zeros(n, device=x_nat.device)
        self.period = max(int(0.22 * steps), 1)
        self.shrink, self.min_period = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
        self.since_check = 0

    @classmethod
    def for_settings(cls, x_nat: torch.Tensor, s) -> "APGD":
        return cls(x_nat, s.norm, to_signed_units(s.eps), s.steps)

    def step(self, x: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        loss = loss.to(self.best_loss.dtype)
        if self.best_x is None:
            self.best_x, self.best_grad = x.clone(), grad.clone()
        better = loss > self.best_loss
        self.best_x[better], self.best_grad[better] = x[better], grad[better]
        self.best_loss = torch.where(better, loss, self.best_loss)
        if self.last_loss is not None:
            self.increases += (loss > self.last_loss).to(self.increases.dtype)
            self.since_check += 1
        self.last_loss = loss
        if self.since_check == self.period:
            oscillating = self.increases <= self.RHO * self.period
            stuck = ~self.reduced_last & (self.best_at_check >= self.best_loss)
            reduce = oscillating | stuck
            self.eta = torch.where(reduce, self.eta / 2, self.eta)
            x, grad = x.clone(), grad.clone()
            x[reduce], grad[reduce] = self.best_x[reduce], self.best_grad[reduce]
            self.reduced_last, self.best_at_check = reduce, self.best_loss.clone()
            self.increases.zero_()
            self.since_check, self.period = 0, max(self.period - self.shrink, self.min_period)
        eta = self.eta.view(-1, *([1] * (x.dim() - 1)))
        z = project(ascent_step(x, grad, self.norm, eta), self.x_nat, self.norm, self.eps)
        if self.prev is not None:
            z = project(x + self.MOMENTUM * (z - x) + (1 - self.MOMENTUM) * (x - self.prev),
                        self.x_nat, self.norm, self.eps)
        self.prev = x
        return z

    def keep(self, mask: torch.Tensor) -> None:
        for name in ("x_nat", "eta", "prev", "best_x", "best_grad", "last_loss", "best_loss", "best_at_check",
                     "reduced_last", "increases"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[mask])


UPDATERS = {"pgd": FixedStep, "apgd": APGD}  # attack.optimizer -> how the iterates move
