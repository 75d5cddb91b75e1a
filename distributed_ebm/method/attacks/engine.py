"""One attack loop and one counting protocol for every mode (Hill, Mitchell, Zhu 2021: BPDA+EOT with the
paper's counting).

What is counted (evaluation points, checks and confirmations, breaks, both natural figures, the adversarial
image, re-evaluation) is defined once, in the README's table "What each reported number means".

What differs between attacks lives in their mode class (`modes.MODES[attack.mode]`: pgd,
bpda_eot, exact_eot, transfer, defense): what is differentiated, who judges, which points are
checked. The judge of a defended mode is the defense: `eot_attack` purified replicates check,
`eot_defense` fresh ones confirm a wrong check; an undefended one's is the classifier alone.
The iterates move by fixed-step PGD or by APGD (`attack.optimizer`, `apgd.UPDATERS`), ascending
the cross-entropy or the DLR loss (`loss`) of the (EOT-averaged) output.

Randomness is keyed by (seed, image id, call), with call = 2 * point for a check, 2 * point + 1
for its confirmation and 2 * points + r for re-evaluation r, so an image's result does not
depend on its batch. Restarts and ensemble members run with seeds of their own (`noise.stream_seed`).

Shapes and devices: images N x C x H x W (float, in [-1, 1]) on any device; labels (N,) and
ids (N,) int64. One rule: every per-image tensor (labels, ids, masks, row numbers, counters)
lives on the images' device. `Attack.__call__` moves labels and ids there once, at entry;
everything inside, the defense (`EOTDefense` checks it) and the updaters (`apgd`) keep to it;
the records are built on the CPU at the end, in one transfer per field.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..defense import LOSSES, EOTDefense, Purifier, same_device
from .apgd import UPDATERS
from .modes import MODES
from .pgd import random_start, to_signed_units

NEVER = -1
VOTES = 3  # the vote counts a record keeps per judgement (`vote_counts`)


@dataclass
class ImageRecord:
    index: int  # dataset id of the image
    label: int
    natural_protocol_pred: int  # the clean image's check prediction, or its confirmation's where the check is wrong
    natural_protocol_correct: bool  # not broken at point 0: check right or confirmation right
    natural_defense_pred: int  # the defense's own vote on the clean image (eot_defense chains); -1 = not judged
    natural_defense_correct: bool
    broken_at: int  # evaluation point of the break (0 = clean image, t + 1 = iterate t); -1 = never
    final_pred: int  # prediction at the break, or at the last evaluation if never broken
    image_steps: int  # Langevin image-steps spent on this image (its share of the compute)
    confirm_image_steps: int  # the part of image_steps spent on confirmations (point 0's vote included)
    adv_image: np.ndarray  # C x H x W float32 in [-1, 1]: the iterate at the break, else the most adversarial one
    adv_loss: float  # the attack loss of adv_image's check output
    reeval_correct: list = field(default_factory=list)  # one flag per re-evaluation of adv_image
    # chains voting for the prediction, for the label, for the strongest other class (`vote_counts`), in the
    # judgement that gave natural_defense_pred and in the one that gave final_pred; -1 = no chain voted
    natural_votes: list = field(default_factory=lambda: [NEVER] * VOTES)
    final_votes: list = field(default_factory=lambda: [NEVER] * VOTES)
    adv_point: int = 0  # the evaluation point of adv_image (0 = the clean image)
    # two EOT gradients: at clean, at adv; None = unchecked
    gradient_cosine: list = field(default_factory=lambda: [None, None])

    @property
    def robust(self) -> bool:
        return self.broken_at == NEVER

    def to_row(self) -> dict:
        row = asdict(self)
        row["adv_image"] = self.adv_image.astype(np.float32).ravel().tolist()
        row["image_shape"] = list(self.adv_image.shape)
        return row


@dataclass
class _Batch:
    """The per-image state of one call, every tensor on the images' device: `rows` the batch rows, `active` those
    not yet broken; what each record will hold (`natural_*`, `broken_at`, `final_*`, `adv*`) as it is known."""
    rows: torch.Tensor
    active: torch.Tensor
    broken_at: torch.Tensor
    natural_pred: torch.Tensor
    natural_vote: torch.Tensor
    natural_votes: torch.Tensor
    final_pred: torch.Tensor
    final_votes: torch.Tensor
    adv: torch.Tensor
    adv_loss: torch.Tensor
    adv_point: torch.Tensor


def vote_counts(counts: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """N x 3 from the chains' N x C vote counts: the chains voting for the judgement's prediction `pred` (the argmax
    of the averaged output, not necessarily the class most chains vote for), for the label, and for the strongest
    class other than the prediction."""
    rows = torch.arange(len(counts), device=counts.device)
    others = counts.clone()
    others[rows, pred] = -1
    rival = others.max(dim=1).values.clamp(min=0) if counts.shape[1] > 1 else torch.zeros_like(pred)
    return torch.stack([counts[rows, pred], counts[rows, labels], rival], dim=1)


def evaluation_points(settings) -> int:
    """Clean image + every PGD iterate (steps + 2), or the clean image alone for a mode that does
    not move (defense); an ensemble's longest member."""
    if settings.ensemble is not None:
        return max(evaluation_points(m) for m in settings.members())
    return settings.steps + 2 if MODES[settings.mode].moves else 1


class Attack:
    """`attack(images, labels, ids) -> list[ImageRecord]` for images in [-1, 1].

    classifier: any module mapping [-1, 1] images to logits; purifier: the defense's purifier
    (ignored by an undefended mode); settings: the attack's `AttackSettings` (the config's `attack` section; the
    method reads its fields and imports no config). Budgets in `settings` are in [0, 1] pixel units.
    After a call, `cost` holds each image's Langevin image-steps (on the images' device);
    `on_point(point, points)` is called as the batch passes each evaluation point.

    Example:
        attack = Attack(classifier, Purifier(ebm, 1500), AttackSettings(mode="bpda_eot"), seed=0)
        records = attack(images, labels, ids)
    """

    def __init__(self, classifier: nn.Module, purifier: Optional[Purifier], settings, *,
                 seed: int = 0, chunk_size: int = 1024, on_point: Callable[[int, int], None] | None = None,
                 natural_defense: bool = True, gradient_ids=()):
        self.s, self.seed, self.on_point = settings, seed, on_point
        self.gradient_ids = torch.as_tensor(sorted(gradient_ids), dtype=torch.int64)  # images of the gradient check
        self.natural_defense = natural_defense  # False: point 0 confirms wrong checks only (no defense vote)
        self.mode = MODES[settings.mode](self)
        if self.mode.defended and purifier is None:
            raise ValueError(f"attack mode {settings.mode} needs a purifier")
        self.classifier = classifier.eval()
        self.defense = EOTDefense(classifier, purifier, chunk_size, settings.average) if purifier else None
        self.eps = to_signed_units(settings.eps)
        self.loss = LOSSES[settings.loss]
        self.cost = None

    @property
    def points(self) -> int:
        return evaluation_points(self.s)

    def judging_seed(self, record: dict) -> int:
        """The seed whose keys judged a record's adversarial image (a row of the records): this attack's."""
        return self.seed

    # The model handles a mode calls (modes.py).
    def classifier_gradient(self, x: torch.Tensor, labels: torch.Tensor):
        """(undefended logits, gradient of the loss) at x."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = self.classifier(x)
            (grad,) = torch.autograd.grad(self.loss(logits, labels).sum(), x)
        return logits.detach(), grad

    def eot(self, x, rows, call, replicates, labels=None, *, exact=False, runs=1, confirm=False, votes=False):
        """EOT logits (and the attack's gradient when labels are given; with `votes`, the N x C counts of the
        chains' own votes) of the images at batch rows `rows`; charges the chains to them: `runs` passes of
        each chain (1, more for an exact gradient), also as confirmation steps when `confirm`."""
        steps = 0 if self.defense.purifier.is_identity else self.defense.purifier.steps * runs
        self.cost[rows] += replicates * steps
        if confirm:
            self.confirm_cost[rows] += replicates * steps
        ids = self._ids[rows]
        if labels is None and votes:
            return self.defense.logits(x, ids, seed=self.seed, call=call, replicates=replicates, votes=True)
        if labels is None:
            return self.defense.logits(x, ids, seed=self.seed, call=call, replicates=replicates)
        return self.defense.logits_and_grad(x, labels, ids, seed=self.seed, call=call, replicates=replicates,
                                            loss=self.loss, exact=exact, segment=self.s.segment,
                                            surrogate_temperature=(self.s.surrogate_temperature if self.s.surrogate
                                                                   else None))

    def _judge(self, point, x, labels, rows, check_logits=None, vote_all=False):
        """(broken mask, prediction, check logits, defense vote or None, votes) at a checked point, with the paper's
        confirmation by a defended mode; `vote_all`: confirm every image, not only wrong checks, and return the
        confirmations as the defense's vote. `votes` (N x 3, `vote_counts`): the chains' votes for the prediction,
        the label and the strongest other class in each image's deciding judgement (its confirmation where it had
        one, else the check it was judged by when that check ran here; -1 where there was none: an undefended mode,
        or a check reused from the gradient pass).
        `rows` are the images' batch rows (all on x's device)."""
        same_device(x=x, labels=labels, rows=rows)
        defended, h = self.mode.defended, self.s.eot_defense
        votes = torch.full((len(x), VOTES), NEVER, dtype=torch.int64, device=x.device)
        if check_logits is None and defended:
            check_logits, counts = self.eot(x, rows, 2 * point, self.s.eot_attack, votes=True)
            votes = vote_counts(counts, check_logits.argmax(1), labels)
        elif check_logits is None:
            check_logits = self.classifier(x)
        pred = check_logits.argmax(1)
        wrong = pred != labels
        vote = None
        if defended and h > 0 and (vote_all or wrong.any()):
            sub = torch.arange(len(x), device=x.device) if vote_all else wrong.nonzero().flatten()
            confirm, sub_counts = self.eot(x[sub], rows[sub], 2 * point + 1, h, confirm=True, votes=True)
            confirm = confirm.argmax(1)
            votes[sub] = vote_counts(sub_counts, confirm, labels[sub])
            vote = confirm if vote_all else None
            confirm, sub = (confirm[wrong], sub[wrong]) if vote_all else (confirm, sub)
            pred[sub] = confirm
            wrong[sub] = confirm != labels[sub]
        elif vote_all:  # no confirmation chains: the check is the defense (or the classifier, undefended)
            vote = check_logits.argmax(1)
        return wrong, pred, check_logits, vote, votes

    def _reevaluate(self, adv, labels, rows) -> list[list[bool]]:
        """Judge every record's adversarial image `reevaluations` times with fresh chains."""
        correct = torch.stack([self.eot(adv, rows, 2 * self.points + r, self.s.eot_defense).argmax(1) == labels
                               for r in range(self.s.reevaluations)], dim=1)
        return correct.cpu().tolist()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> list[ImageRecord]:
        """Attack N images (N x C x H x W); labels and ids (N,) may come on any device (see the module doc)."""
        device = images.device
        labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self._ids = torch.as_tensor(ids, dtype=torch.int64).to(device)
        self.cost = torch.zeros(len(images), dtype=torch.int64, device=device)
        self.confirm_cost = torch.zeros(len(images), dtype=torch.int64, device=device)
        batch = self._judge_clean(images, labels)
        self._report(0)
        if self.mode.moves and len(batch.active):
            self._run_iterates(images, labels, batch)
        reeval = self._reevaluate(batch.adv, labels, batch.rows) if self.s.reevaluations else [[] for _ in batch.rows]
        cosine = self._gradient_check(images, batch.adv, labels, batch.rows)
        self._report(self.points - 1)
        return self._records(labels, batch, reeval, cosine)

    def _judge_clean(self, images: torch.Tensor, labels: torch.Tensor) -> _Batch:
        """Point 0: judge the clean images (with the defense's own vote when `natural_defense`); the images broken
        there leave, the clean image is every record's adversarial image until an iterate is checked."""
        n, device = images.shape[0], images.device
        rows = torch.arange(n, device=device)
        wrong, natural_pred, logits, vote, natural_votes = self._judge(0, images, labels, rows,
                                                                       vote_all=self.natural_defense)
        broken_at = torch.full((n,), NEVER, dtype=torch.int64, device=device)
        broken_at[wrong] = 0
        return _Batch(rows=rows, active=rows[~wrong], broken_at=broken_at, natural_pred=natural_pred,
                      natural_vote=vote if vote is not None else torch.full_like(natural_pred, NEVER),
                      natural_votes=natural_votes, final_pred=natural_pred.clone(), final_votes=natural_votes.clone(),
                      adv=images.detach().clone(), adv_loss=self.loss(logits, labels).to(torch.float64),
                      adv_point=torch.zeros(n, dtype=torch.int64, device=device))

    def _run_iterates(self, images: torch.Tensor, labels: torch.Tensor, b: _Batch) -> None:
        """The attack's iterates from the random start: at each checked point judge the active images, record the
        breaks and the most adversarial iterate so far, drop the broken images, then step the rest."""
        mode, active = self.mode, b.active
        x_nat = images[active]
        x = (random_start(x_nat, self._ids[active], self.seed, self.s.norm, self.eps) if self.s.random_start
             else x_nat.clone())
        update = UPDATERS[self.s.optimizer].for_settings(x_nat, self.s)
        for t in range(self.s.steps + 1):
            point, last = t + 1, t == self.s.steps
            y = labels[active]
            logits, grad = (mode.output(x, active, point), None) if last else mode.gradient(x, y, active, point)
            loss = self.loss(logits, y) if grad is not None else None
            if mode.checked(point, self.points):
                wrong, pred, checked, _, votes = self._judge(point, x, y, active,
                                                             logits if mode.check_from_gradient else None)
                check_loss = self.loss(checked, y).to(torch.float64)
                # the break's iterate, else the most adversarial one so far (the first checked iterate replaces
                # the clean image)
                better = wrong | (check_loss > b.adv_loss[active]) | (point == self._first_checked())
                b.adv[active[better]], b.adv_loss[active[better]] = x[better], check_loss[better]
                b.adv_point[active[better]] = point
                b.broken_at[active[wrong]] = point
                b.final_pred[active], b.final_votes[active] = pred, votes
                keep = ~wrong
                active, x = active[keep], x[keep]
                update.keep(keep)
                grad, loss = (grad[keep], loss[keep]) if grad is not None else (None, None)
            if not len(active):
                break
            if grad is not None:
                x = update.step(x, grad, loss)
            self._report(point)
        b.active = active

    def _records(self, labels: torch.Tensor, b: _Batch, reeval: list, cosine: torch.Tensor) -> list[ImageRecord]:
        """One record per image, built on the CPU (one transfer per field)."""
        ids, labels = self._ids.tolist(), labels.tolist()
        natural_pred, natural_vote = b.natural_pred.tolist(), b.natural_vote.tolist()
        broken_at, final_pred, adv_loss = b.broken_at.tolist(), b.final_pred.tolist(), b.adv_loss.tolist()
        cost, confirm_cost, adv = self.cost.tolist(), self.confirm_cost.tolist(), b.adv.float().cpu().numpy()
        natural_votes, final_votes, adv_point = b.natural_votes.tolist(), b.final_votes.tolist(), b.adv_point.tolist()
        cosine = [[None if v != v else v for v in pair] for pair in cosine.tolist()]  # null: not checked
        return [ImageRecord(index=ids[k], label=labels[k],
                            natural_protocol_pred=natural_pred[k],
                            natural_protocol_correct=natural_pred[k] == labels[k],
                            natural_defense_pred=natural_vote[k], natural_defense_correct=natural_vote[k] == labels[k],
                            broken_at=broken_at[k], final_pred=final_pred[k],
                            image_steps=cost[k], confirm_image_steps=confirm_cost[k],
                            adv_image=adv[k], adv_loss=adv_loss[k], reeval_correct=reeval[k],
                            natural_votes=natural_votes[k], final_votes=final_votes[k], adv_point=adv_point[k],
                            gradient_cosine=cosine[k])
                for k in range(len(ids))]

    def _gradient_check(self, images, adv, labels, rows) -> torch.Tensor:
        """N x 2 cosine similarities of two more EOT gradient estimates, with chains of their own (calls no other
        judgement uses), at the clean image and at the record's adversarial image, for the images of
        `gradient_ids` in this batch (NaN for the others, and for a mode that takes no gradient)."""
        out = torch.full((len(rows), 2), float("nan"), dtype=torch.float64)
        sel = (rows[torch.isin(self._ids, self.gradient_ids.to(self._ids.device))] if len(self.gradient_ids)
               else rows[:0])
        if not len(sel) or not self.mode.moves:
            return out
        # calls 2 * spare and up: after checks, confirmations, re-evaluations
        spare = self.points + self.s.reevaluations
        for j, x in enumerate((images[sel], adv[sel])):
            g1, g2 = (self.mode.gradient(x, labels[sel], sel, spare + 1 + k)[1].flatten(1).double() for k in (0, 1))
            out[sel.cpu(), j] = torch.nn.functional.cosine_similarity(g1, g2, dim=1, eps=1e-30).cpu()
        return out

    def _first_checked(self) -> int:
        """The first checked iterate's point (transfer checks only the last)."""
        return next(p for p in range(1, self.points) if self.mode.checked(p, self.points))

    def _report(self, point: int) -> None:
        if self.on_point is not None:
            self.on_point(point, self.points)
