"""EBM training on Ray Train: DDP workers, the bank in replay-buffer actors, checkpoints, MLflow.

Every worker runs the paper's update on its share of the batch: it leases its chains from the
bank actors, advances them K Langevin steps, returns them, and takes a DDP step on its positives
and negatives (the gradients averaged over workers are those of the whole batch). Iteration t's
draws (chains, restarts, data rows, data noise) come from (seed, t) and the chains' noise from
(seed, slot, t), so a run is the same for any number of workers and resumes exactly.

Checkpoints every `checkpoint_every` iterations hold the model, the optimizer and its phase, the
iteration and the whole bank; Ray Train restarts a run whose worker died from the last one
(`ray.max_failures`), and running the job again with the same `name` and `output` resumes it.
A non-finite loss stops the run with a clear message and leaves the last checkpoint as it was.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import ray
import torch

from .. import storage
from ..config import TrainEBMConfig
from ..data import ImageSet, load, to_uint8, to_unit_range
from ..langevin import langevin
from ..nets import load_ebm, save_ebm
from ..noise import ChainKeys
from ..progress import Progress
from ..report import image_grid_png
from ..training import (TrainingDiverged, check_sizes, ebm_update, iteration_draws, make_ebm_optimizer, new_ebm,
                        phase_at, temperature, training_state)
from .bank_actor import BankShard, ShardedBank, shard_bounds
from .cluster import connect
from .trainer import all_workers, barrier, fit_tracked, mean_over_workers, run_dir, worker_logger

DIVERGED = "diverged.txt"  # written instead of a checkpoint when the loss stops being finite
METRICS = ("energy_diff", "energy_pos", "energy_neg", "loss", "grad_norm", "bank_age", "bank_seconds", "step_seconds")


def train_loop(config: dict) -> None:
    """The per-worker function of the TorchTrainer."""
    import ray.train
    import ray.train.torch

    cfg = TrainEBMConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    pixels = ray.get(config["pixels"][0])  # uint8 N x H x W x C, shared in the object store
    bank = ShardedBank(config["shards"], config["bounds"])
    lv = cfg.langevin
    shape = (pixels.shape[3], pixels.shape[1], pixels.shape[2])

    ebm = new_ebm(cfg).to(device)
    iteration, bank_states = 0, None
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
            if rank == 0:
                bank_states = [torch.load(os.path.join(d, f"bank-{k}.pt"), weights_only=True)
                               for k in range(len(config["shards"]))]
        ebm.load_state_dict(state["ebm"])
        iteration = state["iteration"]
    model = ray.train.torch.prepare_model(ebm) if world > 1 else ebm
    sampler = model.module if hasattr(model, "module") else model
    phase = phase_at(cfg, iteration)
    optimizer = make_ebm_optimizer(model, cfg, phase)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    if rank == 0:  # the bank as of the checkpoint (or fresh); drops every lease, a crashed worker's too
        bank.load(bank_states)
    barrier(world, device)

    logger = worker_logger(config, rank)
    bar = Progress(cfg.iterations, f"train-ebm:{cfg.name}", start=iteration, enabled=rank == 0, every=10.0)
    window = {k: 0.0 for k in METRICS}
    count, t_window = 0, time.time()
    agree = all_workers(world, device)
    bank_size = config["bounds"][-1][1]
    started_at = iteration
    try:
        while iteration < cfg.iterations:
            t0 = time.time()
            if phase_at(cfg, iteration) != phase:
                phase = phase_at(cfg, iteration)
                optimizer = make_ebm_optimizer(model, cfg, phase)
            d = iteration_draws(cfg, iteration, bank_size, len(pixels), shape).part(rank, world)
            tb = time.time()
            start, age = bank.lease(d.slots, d.restart, iteration, rank)
            bank_seconds = time.time() - tb
            keys = ChainKeys(cfg.seed, d.slots, torch.zeros_like(d.slots), call=iteration)
            negatives = langevin(sampler, start.to(device), keys, lv.steps, lv.step_size, lv.noise)
            tb = time.time()
            bank.give_back(d.slots, negatives, lv.steps, d.restart, rank)
            bank_seconds += time.time() - tb
            positives = (to_unit_range(pixels[d.rows.numpy()]) + d.noise).to(device)
            positives = positives.contiguous(memory_format=torch.channels_last)
            m = ebm_update(model, optimizer, positives, negatives, temperature(cfg), agree)
            iteration += 1
            m.update(bank_age=age.float().mean().item(), bank_seconds=bank_seconds, step_seconds=time.time() - t0)
            for k in METRICS:
                window[k] += m[k]
            count += 1
            bar.update(1, energy_diff=m["energy_diff"], phase=phase)
            save = iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations
            if save or iteration % cfg.log_every == 0:
                means = dict(zip(METRICS, mean_over_workers([window[k] / count for k in METRICS], world, device)))
                means.update(iteration=iteration, started_at=started_at, iterations_per_second=count / (time.time() - t_window),
                             bank_share=means["bank_seconds"] / means["step_seconds"], lr=optimizer.param_groups[0]["lr"],
                             sgd=float(phase == "sgd"))
                if logger:
                    logger.metrics({k: v for k, v in means.items() if k != "iteration"}, step=iteration)
                _report(cfg, means, save, rank, world, device, bank, sampler, optimizer, phase, positives, logger)
                window = {k: 0.0 for k in METRICS}
                count, t_window = 0, time.time()
    except TrainingDiverged as err:  # every worker raises it (they agree on finiteness first)
        if rank == 0:  # the run ends cleanly, so Ray Train does not retry a deterministic failure
            storage.write_bytes(storage.join(run_dir(cfg), DIVERGED),
                                f"{err} at iteration {iteration + 1}".encode())
    bar.close()


def _report(cfg, metrics, save, rank, world, device, bank, ebm, optimizer, phase, positives, logger):
    """Every worker reports; at a checkpoint, rank 0 first writes model, optimizer, phase and the bank."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            it = int(metrics["iteration"])
            torch.save(training_state(it, phase, ebm, optimizer, cfg), os.path.join(d, "state.pt"))
            for k, shard_state in enumerate(bank.states()):
                torch.save(shard_state, os.path.join(d, f"bank-{k}.pt"))
            bank.backup()  # what a restarted bank actor comes back from
            save_ebm(ebm, storage.join(run_dir(cfg), "ebm.pt"), iteration=it)
            if logger:
                logger.file(f"bank-{it:09d}.png", image_grid_png(bank.sample(64)), "samples")
                logger.file(f"positives-{it:09d}.png", image_grid_png(positives[:64].cpu()), "samples")
            checkpoint = ray.train.Checkpoint.from_directory(d)
        barrier(world, device)  # nobody leases the next chains before the bank snapshot is taken
        ray.train.report(metrics, checkpoint=checkpoint)


def train_ebm_on_ray(cfg: TrainEBMConfig, data: ImageSet | None = None, show: bool = True) -> dict:
    """Fit the EBM with a TorchTrainer; returns the last metrics, the EBM's URL and the bank actors' books.
    Resumes a run of the same name and output."""
    data = data if data is not None else load(cfg.data)
    check_sizes(cfg, len(data))
    connect(cfg.ray.address)
    pixels = ray.put(to_uint8(data.images))
    size = cfg.bank_size or len(data)
    bounds = shard_bounds(size, cfg.ray.bank_shards)
    shape = tuple(data.images.shape[1:])
    shards = [BankShard.options(num_cpus=0, name=f"debm-bank-{cfg.name}-{k}").remote(
                  lo, hi, shape, cfg.bank_init, cfg.seed, storage.join(run_dir(cfg), "bank", f"shard-{k}.pt"),
                  pixels if cfg.bank_init == "data" else None)
              for k, (lo, hi) in enumerate(bounds)]
    config = {"cfg": cfg.model_dump(mode="json"), "pixels": [pixels], "shards": shards, "bounds": bounds}
    diverged_url = storage.join(run_dir(cfg), DIVERGED)
    if storage.exists(diverged_url):  # a rerun (perhaps with other settings) tries again from the last checkpoint
        storage.filesystem(diverged_url)[0].rm(storage.filesystem(diverged_url)[1])
    try:
        result = fit_tracked(train_loop, cfg, config, "train-ebm", lambda mlflow, _: _log_final_ebm(cfg, mlflow))
        books = ShardedBank(shards, bounds).books()
    finally:
        for s in shards:
            ray.kill(s)
    if result.error:
        raise result.error
    if storage.exists(diverged_url):
        raise TrainingDiverged(f"{storage.read_bytes(diverged_url).decode()}; "
                               f"the last good checkpoint is in {run_dir(cfg)}")
    return {**(result.metrics or {}), "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "ebm": storage.join(run_dir(cfg), "ebm.pt"), "bank_books": books}


def _log_final_ebm(cfg: TrainEBMConfig, mlflow) -> None:
    """The final EBM as an MLflow model (unless the run diverged)."""
    ebm_url = storage.join(run_dir(cfg), "ebm.pt")
    if storage.exists(ebm_url) and not storage.exists(storage.join(run_dir(cfg), DIVERGED)):
        import mlflow.pytorch

        ebm = load_ebm(ebm_url)
        example = np.zeros((1, ebm.channels, ebm.image_size, ebm.image_size), dtype=np.float32)
        mlflow.pytorch.log_model(ebm, name="ebm", input_example=example)
