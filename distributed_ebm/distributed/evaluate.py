"""The evaluation engine on Ray Data: EOT-replicated purify-and-attack passes spread over an actor pool.

Rows (index, image, label) form a Ray Dataset in many blocks; `map_batches` runs `AttackActor`
(one per GPU, or per `cpus_per_actor` CPUs) which loads the classifier and the EBM once and
runs the single-process `Attack` on each batch, writing the batch's records atomically under
`output/records/`. Each image's randomness is keyed by (seed, image id), so the result for an
image does not depend on its batch or on which actor ran it. A rerun skips images with records;
a killed actor is restarted by Ray and its batch retried, so a crash loses at most the batches
in flight. Bad input fails in `preflight`, before any actor starts.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import results, storage
from ..config import AttackConfig, InputError
from ..data import ImageSet, load
from ..evaluation import build_attack, dtype_of, pending, pick_device
from ..progress import Progress
from ..tracking import log_attack
from .cluster import available, connect


class AttackActor:
    """Holds the classifier and the EBM; attacks one batch of rows per call."""

    def __init__(self, cfg: dict, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = AttackConfig.model_validate(cfg)
        self.device = pick_device("auto")  # Ray sets CUDA_VISIBLE_DEVICES for an actor with a GPU
        self.attack = build_attack(self.cfg, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray hands out read-only arrays: copy them into tensors of our own
        images = torch.tensor(np.stack(batch["image"])).to(self.device, dtype_of(self.cfg))
        labels = torch.tensor(batch["label"], dtype=torch.int64).to(self.device)
        ids = torch.tensor(batch["index"], dtype=torch.int64).to(self.device)
        records = self.attack(images, labels, ids)
        results.write_part(self.cfg.output, records)
        return {"index": np.array(batch["index"], dtype=np.int64), "broken": np.array([not r.robust for r in records]),
                "image_steps": np.array([r.image_steps for r in records], dtype=np.int64)}


def preflight(cfg: AttackConfig, data: ImageSet | None = None) -> ImageSet:
    """Everything that can be checked before an actor starts: data, subset, weights, EBM image size."""
    data = data if data is not None else load(cfg.data)
    if len(data) == 0:
        raise InputError("the selected subset holds no image")
    if data.images.shape[-1] != cfg.data.image_size:
        raise InputError(f"images are {data.images.shape[-1]} pixels wide, data.image_size is {cfg.data.image_size}")
    build_attack(cfg, "cpu")  # loads the classifier and the EBM: missing files, wrong architecture or size
    return data


def plan_actors(cfg: AttackConfig, batches: int) -> tuple[int, float, float]:
    """(actors, cpus, gpus per actor): one actor per GPU when the cluster has GPUs, else per cpus_per_actor CPUs."""
    gpus = cfg.ray.gpus_per_actor if cfg.ray.gpus_per_actor is not None else (1.0 if available("GPU") >= 1 else 0.0)
    cpus = cfg.ray.cpus_per_actor
    fit = int(available("GPU") // gpus) if gpus else int(available("CPU") // cpus)
    actors = cfg.ray.actors or max(1, fit)
    return max(1, min(actors, batches)), cpus, gpus


def evaluate(cfg: AttackConfig, data: ImageSet | None = None, show: bool = True) -> dict:
    """Attack every selected image that has no record yet on a Ray actor pool; summarize all records."""
    data = preflight(cfg, data)
    todo = pending(data, cfg.output)
    bar = Progress(len(data), f"attack:{cfg.attack.mode}", start=len(data) - len(todo), enabled=show, unit="img")
    t0 = time.time()
    if len(todo):
        ray = connect(cfg.ray.address)
        batches = -(-len(todo) // cfg.batch_size)
        actors, cpus, gpus = plan_actors(cfg, batches)
        rows = [{"index": int(i), "label": int(y), "image": x.numpy()}
                for i, y, x in zip(todo.ids, todo.labels, todo.images)]
        ds = ray.data.from_items(rows, override_num_blocks=batches)
        out = ds.map_batches(
            AttackActor, fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "threads": max(1, int(cpus))},
            batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cpus, num_gpus=gpus,
            # Ray Data's actor pools restart a dead actor and retry its batch (max_restarts and
            # max_task_retries default to -1 there); the test kills one to hold it to that.
            compute=ray.data.ActorPoolStrategy(size=actors))
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            bar.update(len(batch["index"]), broken=int(batch["broken"].sum()))
    bar.close()
    summary = results.finalize(cfg, time.time() - t0, set(data.ids.tolist()), set(todo.ids.tolist()))
    log_attack(cfg, summary, [storage.join(cfg.output, results.SUMMARY), storage.join(cfg.output, results.PLOT)])
    return summary
