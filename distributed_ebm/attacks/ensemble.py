"""Worst case over attacks, as AutoAttack counts it (`attack.ensemble`): each image is attacked by
each attack in turn until one breaks it, and is robust only if it survives them all.

A thin layer over `Attack`: every member runs the full counting protocol on the images still
standing, with the run's seed, so an image's result under a member is the one that member alone
would give (randomness is keyed by seed, image id and call): the ensemble's robust images are
exactly the images every member alone leaves robust. The natural judgement is the first member's;
a later member that misjudges the clean image (a stochastic defense) breaks it at point 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import AttackSettings
from ..defense import Purifier
from .engine import NEVER, Attack, ImageRecord


@dataclass
class EnsembleRecord(ImageRecord):
    broken_by: int = NEVER  # the member that broke the image (its index in attack.ensemble); -1 = none


class EnsembleAttack:
    """`attack(images, labels, ids) -> list[EnsembleRecord]`: broken_at, final_pred and adv_image are
    those of the member that broke the image (else of the last member); image_steps sums all members'.

    The same handles as `Attack`: `defense` (the members share one purifier), `cost` after a call
    (image-steps per image, on the CPU), `on_point` (handed to every member in turn)."""

    def __init__(self, classifier: nn.Module, purifier: Optional[Purifier], settings: AttackSettings, *,
                 seed: int = 0, chunk_size: int = 1024):
        self.members = [Attack(classifier, purifier, m, seed=seed, chunk_size=chunk_size) for m in settings.members()]
        self.cost = None

    @property
    def defense(self):
        return self.members[0].defense

    @property
    def on_point(self):
        return self.members[0].on_point

    @on_point.setter
    def on_point(self, hook) -> None:
        for m in self.members:
            m.on_point = hook

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> list[EnsembleRecord]:
        ids, labels = torch.as_tensor(ids, dtype=torch.int64), torch.as_tensor(labels, dtype=torch.int64)
        n = len(ids)
        final: list[Optional[ImageRecord]] = [None] * n
        first: list[Optional[ImageRecord]] = [None] * n
        by, cost = [NEVER] * n, [0] * n
        todo = list(range(n))
        for k, attack in enumerate(self.members):
            if not todo:
                break
            rows = torch.tensor(todo)
            records = attack(images[rows.to(images.device)], labels[rows.to(labels.device)], ids[rows.to(ids.device)])
            for row, r in zip(todo, records):
                first[row] = first[row] or r
                final[row], cost[row] = r, cost[row] + r.image_steps
                if not r.robust:
                    by[row] = k
            todo = [row for row, r in zip(todo, records) if r.robust]
        self.cost = torch.tensor(cost, dtype=torch.int64)
        return [EnsembleRecord(r.index, r.label, f.natural_pred, f.natural_correct, r.broken_at, r.final_pred, c,
                               r.adv_image, r.reeval_correct, b)
                for r, f, c, b in zip(final, first, cost, by)]
