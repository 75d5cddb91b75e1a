"""Worst case over attacks and restarts, as AutoAttack counts it (`attack.ensemble`, `attack.restarts`):
each image is attacked by each run in turn (member 0's restarts 0..R-1, then member 1's, ...) until
one breaks it, and is robust only if it survives them all.

A thin layer over `Attack`: every run is the full counting protocol on the images still standing,
with a seed of its own, `noise.stream_seed(seed, member, restart)`, so its random start, its chains
and its confirmations draw noise independent of every other run's (member 0, restart 0 keeps the
run seed: one run keys exactly as a plain attack). `attack.ensemble_keys: paired` gives every member
the keys of member 0 (restart r of each member shares restart r's stream), so that two members are
compared on the same luck, as when each runs alone with the run's seed. The natural judgements are
the first run's; a later run that misjudges the clean image (a stochastic defense) breaks it at point 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..defense import Purifier
from ..noise import stream_seed
from .engine import NEVER, Attack, ImageRecord


@dataclass
class EnsembleRecord(ImageRecord):
    broken_by: int = NEVER  # the member that broke the image (its index in attack.ensemble, 0 without one); -1 = none
    broken_restart: int = NEVER  # the restart (0 ... attack.restarts - 1) of that member that broke it; -1 = none


class EnsembleAttack:
    """`attack(images, labels, ids) -> list[EnsembleRecord]`: broken_at, final_pred and adv_image are
    those of the run that broke the image (else of the last run); image_steps sums all runs'.

    The same handles as `Attack`: `defense` (the runs share one purifier), `cost` after a call
    (image-steps per image, on the CPU), `on_point` (handed to every run in turn)."""

    def __init__(self, classifier: nn.Module, purifier: Optional[Purifier], settings, *,
                 seed: int = 0, chunk_size: int = 1024, gradient_ids=()):
        paired = settings.ensemble_keys == "paired"
        self.runs = [(k, r, Attack(classifier, purifier, m, seed=stream_seed(seed, 0 if paired else k, r),
                                   chunk_size=chunk_size, natural_defense=(k, r) == (0, 0),
                                   gradient_ids=gradient_ids if (k, r) == (0, 0) else ()))
                     for k, m in enumerate(settings.members()) for r in range(settings.restarts)]
        self.cost = None

    @property
    def defense(self):
        return self.runs[0][2].defense

    def judging_seed(self, record: dict) -> int:
        """The seed of the run whose keys judged a record's adversarial image (a row of the records): the run that
        broke it (member `broken_by`, restart `broken_restart`), or for an image never broken the last run."""
        k, r = record.get("broken_by", NEVER), record.get("broken_restart", NEVER)
        if k < 0:
            return self.runs[-1][2].seed
        return next(attack.seed for kk, rr, attack in self.runs if (kk, rr) == (k, r))

    @property
    def on_point(self):
        return self.runs[0][2].on_point

    @on_point.setter
    def on_point(self, hook) -> None:
        for _, _, attack in self.runs:
            attack.on_point = hook

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> list[EnsembleRecord]:
        ids, labels = torch.as_tensor(ids, dtype=torch.int64), torch.as_tensor(labels, dtype=torch.int64)
        n = len(ids)
        final: list[Optional[ImageRecord]] = [None] * n
        first: list[Optional[ImageRecord]] = [None] * n
        by, restart, cost, confirm = [NEVER] * n, [NEVER] * n, [0] * n, [0] * n
        todo = list(range(n))
        for k, r, attack in self.runs:
            if not todo:
                break
            rows = torch.tensor(todo)
            records = attack(images[rows.to(images.device)], labels[rows.to(labels.device)], ids[rows.to(ids.device)])
            for row, rec in zip(todo, records):
                first[row] = first[row] or rec
                final[row], cost[row], confirm[row] = (rec, cost[row] + rec.image_steps,
                                                       confirm[row] + rec.confirm_image_steps)
                if not rec.robust:
                    by[row], restart[row] = k, r
            todo = [row for row, rec in zip(todo, records) if rec.robust]
        self.cost = torch.tensor(cost, dtype=torch.int64)
        return [EnsembleRecord(r.index, r.label, f.natural_protocol_pred, f.natural_protocol_correct,
                               f.natural_defense_pred, f.natural_defense_correct, r.broken_at, r.final_pred, c, cc,
                               r.adv_image, r.adv_loss, r.reeval_correct, f.natural_votes, r.final_votes, r.adv_point,
                               f.gradient_cosine, broken_by=b, broken_restart=rs)
                for r, f, c, cc, b, rs in zip(final, first, cost, confirm, by, restart)]
