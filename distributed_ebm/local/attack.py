"""The attack's one-process executor: the batches on one device, without Ray (`recipes.attack.run_attack`
runs the job around it). Images, labels and ids of a batch go to the attack's device together (the engine's
device rule). The reference the Ray executor is measured against: same `Attack`, same record files."""
from __future__ import annotations

import torch

from ..config import AttackConfig
from ..method.devices import job_device
from ..method.pixels import unit_range
from ..recipes.attack import dtype_of
from ..results import records as results
from ..store.data import ImageSet, read_images


class OneProcess:
    """Runs the driver's own attack batch by batch on `device` (auto: CUDA when present). No MLflow unless
    `tracking` (a machine with one GPU often has none)."""

    def __init__(self, device: str | torch.device = "auto", tracking: bool = False):
        self.device, self.tracking = job_device(device), tracking

    def images(self, cfg: AttackConfig) -> ImageSet:
        return read_images(cfg.data)

    def run(self, cfg: AttackConfig, todo: ImageSet, settings: dict, attack, gradient_ids, on_batch,
            reruns: int) -> None:
        for batch in batches(todo, cfg.batch_size):
            images = unit_range(batch.data, self.device).to(dtype_of(cfg))  # uint8 to the device, floats there
            records = attack(images, batch.labels.to(self.device), batch.ids.to(self.device))
            results.write_part(cfg.output, records, settings)
            on_batch(len(records), sum(not r.robust for r in records))


def batches(data: ImageSet, size: int):
    for i in range(0, len(data), size):
        yield data.take(torch.arange(i, min(i + size, len(data))))
