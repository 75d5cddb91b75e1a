"""One attack loop and one counting protocol for every mode (../shared/PAPER.md, 'The attack').

Evaluation points: point 0 is the clean image, point t + 1 is PGD iterate t (t = 0 is the
random start, t = steps the last iterate), so `steps` PGD steps give steps + 2 points.
At a checked point an image is *broken* when its check prediction is wrong and a fresh
confirmation prediction is wrong too; once broken it stays broken and leaves the batch.

Modes (`AttackSettings.mode`):
- bpda_eot: gradients and checks from `eot_attack` purified replicates (BPDA: identity Jacobian
  through the purifier), confirmation by `eot_defense` fresh replicates, every point checked.
- exact_eot: as bpda_eot, but the gradient goes through every Langevin step of every replicate
  (Hessian-vector products of the EBM, checkpointed every `segment` steps; `exact_chain`);
  `surrogate: softplus` takes them from a smooth stand-in for a LeakyReLU EBM (kink-aware).
- pgd: plain PGD on the undefended classifier; checks are its own predictions, every point.
- transfer: PGD on the undefended classifier; the defense judges the clean image and the last iterate.
- defense: the defense judges the clean image only (natural accuracy of the defended classifier).

The iterates move by fixed-step PGD or by APGD (`optimizer`), ascending the cross-entropy or
the DLR loss (`loss`) of the (EOT-averaged) output.

Stochastic-defense reporting (`reevaluations` = R > 0): after the attack, each image's final
adversarial image (the one at its break, else the last iterate; the clean image if the clean
image was already misclassified) is judged R more times by the defense with fresh chains
(`eot_defense` each); the summary gives the mean accuracy over the R judgements and the
worst case (the share of images judged correctly all R times) beside the protocol's figure.

Randomness is keyed by (seed, image id, call), with call = 2 * point for a check, 2 * point + 1
for its confirmation and 2 * points + r for re-evaluation r, so an image's result does not
depend on its batch.

Shapes and devices: images N x C x H x W (float, in [-1, 1]) on any device; labels (N,) and
ids (N,) int64. One rule: every per-image tensor (labels, ids, masks, row numbers, counters)
lives on the images' device. `Attack.__call__` moves labels and ids there once, at entry;
everything inside, the defense (`EOTDefense` checks it) and the updaters (`apgd`) keep to it;
the records are built on the CPU at the end, in one transfer per field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import AttackSettings
from ..defense import LOSSES, EOTDefense, Purifier, same_device
from .apgd import APGD, FixedStep
from .pgd import random_start, to_signed_units

NEVER = -1


@dataclass
class ImageRecord:
    index: int  # dataset id of the image
    label: int
    natural_pred: int  # defended (or, in mode pgd, undefended) prediction on the clean image
    natural_correct: bool
    broken_at: int  # evaluation point of the break (0 = clean image, t + 1 = iterate t); -1 = never
    final_pred: int  # prediction at the break, or at the last evaluation if never broken
    image_steps: int  # Langevin image-steps spent on this image (its share of the compute)
    adv_image: np.ndarray  # C x H x W float32 in [-1, 1]: the image at the break, or the last iterate
    reeval_correct: list = field(default_factory=list)  # one flag per re-evaluation of adv_image

    @property
    def robust(self) -> bool:
        return self.broken_at == NEVER

    def to_row(self) -> dict:
        row = asdict(self)
        row["adv_image"] = self.adv_image.astype(np.float32).ravel().tolist()
        row["image_shape"] = list(self.adv_image.shape)
        return row


def evaluation_points(settings: AttackSettings) -> int:
    """Clean image + every PGD iterate (steps + 2), or the clean image alone for mode defense;
    an ensemble's longest member."""
    if settings.ensemble is not None:
        return max(evaluation_points(m) for m in settings.members())
    return 1 if settings.mode == "defense" else settings.steps + 2


def _classifier_logits_and_grad(classifier: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = classifier(x)
        (grad,) = torch.autograd.grad(loss(logits, labels).sum(), x)
    return logits.detach(), grad


class Attack:
    """`attack(images, labels, ids) -> list[ImageRecord]` for images in [-1, 1].

    classifier: any module mapping [-1, 1] images to logits; purifier: the defense's purifier
    (ignored by mode pgd). Budgets in `settings` are in [0, 1] pixel units.

    Example:
        attack = Attack(classifier, Purifier(ebm, 1500), AttackSettings(mode="bpda_eot"), seed=0)
        records = attack(images, labels, ids)
    """

    def __init__(self, classifier: nn.Module, purifier: Optional[Purifier], settings: AttackSettings, *,
                 seed: int = 0, chunk_size: int = 1024, on_point: Callable[[int, int], None] | None = None):
        if settings.mode != "pgd" and purifier is None:
            raise ValueError(f"attack mode {settings.mode} needs a purifier")
        self.classifier = classifier.eval()
        self.defense = EOTDefense(classifier, purifier, chunk_size, settings.average) if purifier else None
        self.s, self.seed, self.on_point = settings, seed, on_point
        self.eps, self.alpha = to_signed_units(settings.eps), to_signed_units(settings.step_size)
        self.loss = LOSSES[settings.loss]

    @property
    def points(self) -> int:
        return evaluation_points(self.s)

    def _checked(self, point: int) -> bool:
        if self.s.mode in ("pgd", "bpda_eot", "exact_eot"):
            return True
        return point == 0 or (self.s.mode == "transfer" and point == self.points - 1)

    def _eot(self, x, rows, call, replicates, labels=None):
        """EOT logits (and the attack's gradient when labels are given) of the images at batch rows
        `rows`; charges the chains' cost to them (an exact gradient runs each chain three times:
        outputs, forward, recomputation)."""
        exact = labels is not None and self.s.mode == "exact_eot"
        kinked = self.s.surrogate and getattr(self.defense.purifier.ebm, "piecewise_linear", False)
        runs = (4 if kinked else 3) if exact else 1  # the kink-aware recomputation runs both energies
        steps = 0 if self.defense.purifier.is_identity else self.defense.purifier.steps * runs
        self._cost[rows] += replicates * steps
        ids = self._ids[rows]
        if labels is None:
            return self.defense.logits(x, ids, seed=self.seed, call=call, replicates=replicates)
        return self.defense.logits_and_grad(x, labels, ids, seed=self.seed, call=call, replicates=replicates,
                                            loss=self.loss, exact=exact, segment=self.s.segment,
                                            surrogate_temperature=self.s.surrogate_temperature if self.s.surrogate else None)

    def _judge(self, point, x, labels, rows, check_logits=None):
        """(broken mask, prediction) at a checked point, with the paper's confirmation; `rows` are
        the images' batch rows (all on x's device)."""
        same_device(x=x, labels=labels, rows=rows)
        if check_logits is None:
            check_logits = (self.classifier(x) if self.s.mode == "pgd"
                            else self._eot(x, rows, 2 * point, self.s.eot_attack))
        pred = check_logits.argmax(1)
        wrong = pred != labels
        if self.s.mode != "pgd" and self.s.eot_defense > 0 and wrong.any():
            sub = wrong.nonzero().flatten()
            confirm = self._eot(x[sub], rows[sub], 2 * point + 1, self.s.eot_defense).argmax(1)
            pred[sub] = confirm
            wrong[sub] = confirm != labels[sub]
        return wrong, pred

    def _gradient(self, point, x, labels, rows):
        """(logits of what is attacked, ascent gradient) at iterate x."""
        if self.s.mode in ("bpda_eot", "exact_eot"):
            return self._eot(x, rows, 2 * point, self.s.eot_attack, labels)
        return _classifier_logits_and_grad(self.classifier, x, labels, self.loss)

    def _updater(self, x_nat):
        if self.s.optimizer == "apgd":
            return APGD(x_nat, self.s.norm, self.eps, self.s.steps)
        return FixedStep(x_nat, self.s.norm, self.eps, self.alpha)

    def _reevaluate(self, adv, labels, rows) -> list[list[bool]]:
        """Judge every final adversarial image `reevaluations` times with fresh chains."""
        correct = torch.stack([self._eot(adv, rows, 2 * self.points + r, self.s.eot_defense).argmax(1) == labels
                               for r in range(self.s.reevaluations)], dim=1)
        return correct.cpu().tolist()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> list[ImageRecord]:
        """Attack N images (N x C x H x W); labels and ids (N,) may come on any device (see the module doc)."""
        n, device = images.shape[0], images.device
        labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self._ids = torch.as_tensor(ids, dtype=torch.int64).to(device)
        rows = torch.arange(n, device=device)
        broken_at = torch.full((n,), NEVER, dtype=torch.int64, device=device)
        self._cost = torch.zeros(n, dtype=torch.int64, device=device)
        adv = images.detach().clone()

        wrong, natural_pred = self._judge(0, images, labels, rows)
        final_pred = natural_pred.clone()
        broken_at[wrong] = 0
        active = rows[~wrong]
        self._report(0)

        if self.s.mode != "defense" and len(active):
            x_nat = images[active]
            x = (random_start(x_nat, self._ids[active], self.seed, self.s.norm, self.eps) if self.s.random_start
                 else x_nat.clone())
            update = self._updater(x_nat)
            judged_by_attack = self.s.mode in ("pgd", "bpda_eot", "exact_eot")
            for t in range(self.s.steps + 1):
                point, last = t + 1, t == self.s.steps
                y = labels[active]
                if last:
                    logits, grad = None, None
                    if self.s.mode == "pgd":
                        logits = self.classifier(x)
                    elif self.s.mode in ("bpda_eot", "exact_eot"):
                        logits = self._eot(x, active, 2 * point, self.s.eot_attack)
                else:
                    logits, grad = self._gradient(point, x, y, active)
                loss = self.loss(logits, y) if grad is not None else None
                if self._checked(point):
                    wrong, pred = self._judge(point, x, y, active, logits if judged_by_attack else None)
                    broken_at[active[wrong]] = point
                    final_pred[active] = pred
                    adv[active[wrong]] = x[wrong]
                    keep = ~wrong
                    active, x = active[keep], x[keep]
                    update.keep(keep)
                    grad, loss = (grad[keep], loss[keep]) if grad is not None else (None, None)
                if not len(active):
                    break
                if grad is not None:
                    x = update.step(x, grad, loss)
                self._report(point)
            adv[active] = x
        reeval = self._reevaluate(adv, labels, rows) if self.s.reevaluations else [[] for _ in range(n)]
        self._report(self.points - 1)

        ids, labels = self._ids.tolist(), labels.tolist()
        natural_pred, broken_at, final_pred = natural_pred.tolist(), broken_at.tolist(), final_pred.tolist()
        cost, adv = self._cost.tolist(), adv.float().cpu().numpy()
        return [ImageRecord(ids[k], labels[k], natural_pred[k], natural_pred[k] == labels[k], broken_at[k],
                            final_pred[k], cost[k], adv[k], reeval[k])
                for k in range(n)]

    def _report(self, point: int) -> None:
        if self.on_point is not None:
            self.on_point(point, self.points)


def accuracy_curve(broken_at: list[int], points: int) -> list[float]:
    """Share of images not yet broken after each evaluation point."""
    b = np.asarray(broken_at)
    if b.size == 0:
        return [float("nan")] * points
    return [float(np.mean((b == NEVER) | (b > p))) for p in range(points)]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(natural_correct: list[bool], broken_at: list[int], points: int,
              reeval_correct: list[list[bool]] | None = None) -> dict:
    """Natural and robust accuracy (with 95% Wilson intervals) and the accuracy curve; with
    re-evaluations, also their mean accuracy, each one's accuracy, and the worst case (images
    judged correctly every time)."""
    n = len(broken_at)
    natural = int(sum(bool(c) for c in natural_correct))
    robust = int(sum(b == NEVER for b in broken_at))
    summary = {
        "images": n,
        "natural_accuracy": natural / n if n else float("nan"),
        "natural_ci95": wilson_interval(natural, n),
        "robust_accuracy": robust / n if n else float("nan"),
        "robust_ci95": wilson_interval(robust, n),
        "accuracy_curve": accuracy_curve(list(broken_at), points),
    }
    if reeval_correct and n and len(reeval_correct[0]):
        flags = np.asarray(reeval_correct, dtype=bool)  # images x R
        worst = int(flags.all(axis=1).sum())
        summary.update({
            "reevaluations": int(flags.shape[1]),
            "reeval_accuracies": flags.mean(axis=0).tolist(),
            "reeval_mean_accuracy": float(flags.mean()),
            "worst_case_accuracy": worst / n,
            "worst_case_ci95": wilson_interval(worst, n),
        })
    return summary
