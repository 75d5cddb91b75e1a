"""EBM training on Ray Train: DDP workers, the bank in replay-buffer actors, checkpoints, MLflow.

Every worker runs the method's loop (`training.run_ebm` over `EBMIteration`) on its share of the batch: it
leases its chains from the bank actors, advances them K Langevin steps, returns them, and takes a DDP step
on its positives and negatives (the gradients averaged over workers are those of the whole batch).
Iteration t's draws (chains, restarts, data rows, data noise) come from (seed, t) and the chains' noise
from (seed, slot, t), so a run is the same for any number of workers and resumes exactly.

Checkpoints every `checkpoint_every` iterations are the one training checkpoint (`store/checkpoints.py`):
each checkpoint folder holds `ckpt.pt` (model, optimizer and phase, iteration, history, the fingerprint of
the settings that change results) and the whole bank (`bank-k.pt`, each shard writes its part). Ray Train
restarts a run whose worker or bank shard died from the newest registered checkpoint (`ray.max_failures`);
running the job again with the same `name` and `output` resumes it, unless settings that change results
differ. `ebm.pt` is written once a checkpoint is registered. A non-finite loss stops the run with a clear
message and leaves the last checkpoint as it was.
"""
from __future__ import annotations

import os
import tempfile

import ray
import torch

from ..config import TrainEBMConfig, to_yaml
from ..method.pixels import unit_range
from ..method.precision import set_arithmetic
from ..method.training import METRICS, EBMIteration, TrainingDiverged, run_ebm, time_split
from ..recipes.training import initial_ebm, preflight_ebm
from ..results.report import image_grid_png
from ..store import storage
from ..store.checkpoints import (
    CKPT,
    check_fingerprint,
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
    save_ebm,
    settings_fingerprint,
)
from ..store.data import ImageSet, read_images
from ..store.released import load_ebm
from ..store.tracking import log_torch_model
from .bank_shards import BankShard, ShardedBank, shard_bounds
from .cluster import check_one_storage, connect
from .ray_train import (
    WorkerProgress,
    all_workers,
    barrier,
    fit_tracked,
    mean_over_workers,
    prepare_model,
    run_dir,
    worker_device,
    worker_logger,
)

DIVERGED = "diverged.txt"  # written instead of a checkpoint when the loss stops being finite


def train_loop(config: dict) -> None:
    """The per-worker function of the TorchTrainer."""
    import ray.train
    import ray.train.torch

    cfg = TrainEBMConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(config)
    set_arithmetic(device, cfg.precision)
    pixels = ray.get(config["pixels"][0])  # uint8 N x H x W x C, shared in the object store
    bank = ShardedBank(config["shards"], config["bounds"])
    shape = (pixels.shape[3], pixels.shape[1], pixels.shape[2])

    ebm = initial_ebm(cfg).to(device)
    state, folder = None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # read from storage directly: the bank parts in the folder are the shards' business
        folder = storage.join(run_dir(cfg), os.path.basename(checkpoint.path.rstrip("/")))
        state = load_checkpoint(storage.join(folder, CKPT))
        ebm.load_state_dict(state["state_dict"])
    model = prepare_model(ebm, config) if world > 1 else ebm

    def images(rows):  # the batch's uint8 rows to the device, floats made there
        return unit_range(torch.from_numpy(pixels[rows.numpy()]).permute(0, 3, 1, 2), device)

    ebm_iteration = EBMIteration(cfg, model, bank, images, len(pixels), shape,
                        config["bounds"][-1][1], rank, world, device, all_workers(world, device))
    history = {"iteration": [], **{k: [] for k in METRICS}, "bank_energy": []}
    if state is not None:
        ebm_iteration.resume(state["iteration"], state["training"]["phase"], state["training"]["optimizer"])
        history = state["training"]["history"]
    if rank == 0:  # the bank as of the checkpoint (or fresh); drops every lease, a crashed worker's too
        bank.load(folder)
        _restore_run_folder(cfg, ebm_iteration.iteration, ebm)
    barrier(world, device)

    logger = worker_logger(config, rank)
    bar = WorkerProgress(config, rank, cfg.iterations, f"train-ebm:{cfg.name}", start=ebm_iteration.iteration)
    started_at, pending = ebm_iteration.iteration, {}

    def on_log(t, means, m):
        means.update(iteration=t, started_at=started_at, bank_share=means["bank_seconds"] / means["step_seconds"],
                     lr=m["lr"], sgd=float(ebm_iteration.phase == "sgd"))
        history["iteration"].append(t)
        for k in METRICS:
            history[k].append(means[k])
        if logger:
            logger.metrics({k: v for k, v in means.items() if k != "iteration"}, step=t)
        pending.update(metrics=means)
        if t % cfg.checkpoint_every and t != cfg.iterations:  # no checkpoint at t: report now
            ray.train.report(means)

    def on_save(t):
        _checkpoint(cfg, config["fingerprint"], pending["metrics"], rank, world, device, bank, ebm_iteration, history,
                    logger)

    try:
        run_ebm(ebm_iteration, cfg.iterations, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                on_log=on_log, on_save=on_save,
                on_step=lambda m: bar.update(1, energy_diff=m["energy_diff"], phase=ebm_iteration.phase,
                                             chain_bank_update=time_split(m)),
                reduce=lambda values: mean_over_workers(values, world, device))
    except TrainingDiverged as err:  # every worker raises it (they agree on finiteness first)
        if rank == 0:  # the run ends cleanly, so Ray Train does not retry a deterministic failure
            storage.write_bytes(storage.join(run_dir(cfg), DIVERGED),
                                f"{err} at iteration {ebm_iteration.iteration + 1}".encode())
    bar.close()


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint_{iteration:09d}"


def _restore_run_folder(cfg, iteration: int, ebm) -> None:
    """On (re)start, from the newest registered checkpoint: remove the folders of later checkpoints a
    crash left unregistered (Ray Train never resumes from them), and make ebm.pt this checkpoint's model."""
    fs, path = storage.filesystem(run_dir(cfg))
    fs.invalidate_cache()
    for folder in fs.glob(f"{path}/checkpoint_*"):
        tail = os.path.basename(folder).removeprefix("checkpoint_")
        if tail.isdigit() and int(tail) > iteration:
            fs.rm(folder, recursive=True)
    ebm_url = storage.join(run_dir(cfg), "ebm.pt")
    if iteration and (not storage.exists(ebm_url) or storage.load_torch(ebm_url).get("iteration") != iteration):
        save_ebm(ebm, ebm_url, iteration=iteration)
    elif not iteration and storage.exists(ebm_url):
        fs.rm(storage.filesystem(ebm_url)[1])


def _checkpoint(cfg, fingerprint, metrics, rank, world, device, bank, ebm_iteration, history, logger):
    """Every worker reports, with the checkpoint: the shards write their parts of the bank into the checkpoint's
    folder, rank 0 adds `ckpt.pt`, and once Ray Train has registered the checkpoint, writes ebm.pt: ebm.pt is
    always the newest registered checkpoint's model."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    it = ebm_iteration.iteration
    name = checkpoint_name(it)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            bank.save(storage.join(run_dir(cfg), name))
            save_checkpoint(d, ebm_iteration.sampler, it, ebm_iteration.phase, ebm_iteration.optimizer, fingerprint,
                            to_yaml(cfg), history, [])
            if logger:
                logger.file(f"bank-{it:09d}.png", image_grid_png(bank.sample(64)), "samples")
                logger.file(f"positives-{it:09d}.png", image_grid_png(ebm_iteration.positives[:64].cpu()), "samples")
            checkpoint = ray.train.Checkpoint.from_directory(d)
        barrier(world, device)  # nobody leases the next chains before the bank is saved
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    if rank == 0:
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        save_ebm(ebm_iteration.sampler, storage.join(run_dir(cfg), "ebm.pt"), iteration=it)


def check_resume(cfg: TrainEBMConfig, fingerprint: dict) -> None:
    """A run resumed with settings (or data) that change results fails here, before any work, naming them."""
    fs, path = storage.filesystem(run_dir(cfg))
    fs.invalidate_cache()
    for folder in sorted(fs.glob(f"{path}/checkpoint_*")):
        url = storage.join(run_dir(cfg), os.path.basename(folder), CKPT)
        if storage.exists(url):
            check_fingerprint(load_checkpoint(url)["training"]["fingerprint"], fingerprint, run_dir(cfg))


def train_ebm_on_ray(cfg: TrainEBMConfig, data: ImageSet | None = None, show: bool = True) -> dict:
    """Fit the EBM with a TorchTrainer; returns the last metrics, the EBM's URL and the bank actors' books.
    Resumes a run of the same name and output."""
    data = data if data is not None else read_images(cfg.data)
    preflight_ebm(cfg, data)  # sizes, channels, output, MLflow: before Ray starts
    fingerprint = {**settings_fingerprint(cfg), **data_fingerprint(data)}
    check_resume(cfg, fingerprint)
    connect(cfg.ray.address)
    check_one_storage(cfg.output, "output", cfg.ray.shared_filesystem)
    pixels = ray.put(data.pixels())  # uint8, as read: the workers make floats of their batches only
    size = cfg.bank_size or len(data)
    bounds = shard_bounds(size, cfg.ray.bank_shards)
    shape = tuple(data.data.shape[1:])
    shards = [BankShard.options(num_cpus=0, name=f"debm-bank-{cfg.name}-{k}").remote(
                  lo, hi, shape, cfg.bank_init, cfg.seed, pixels if cfg.bank_init == "data" else None)
              for k, (lo, hi) in enumerate(bounds)]
    config = {"cfg": cfg.model_dump(mode="json"), "pixels": [pixels], "shards": shards, "bounds": bounds,
              "fingerprint": fingerprint}
    diverged_url = storage.join(run_dir(cfg), DIVERGED)
    if storage.exists(diverged_url):  # a rerun (perhaps with other settings) tries again from the last checkpoint
        storage.filesystem(diverged_url)[0].rm(storage.filesystem(diverged_url)[1])
    try:
        result = fit_tracked(train_loop, cfg, config, "train-ebm", lambda: _log_final_ebm(cfg))
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


def _log_final_ebm(cfg: TrainEBMConfig) -> None:
    """The final EBM as an MLflow model (unless the run diverged)."""
    ebm_url = storage.join(run_dir(cfg), "ebm.pt")
    if storage.exists(ebm_url) and not storage.exists(storage.join(run_dir(cfg), DIVERGED)):
        ebm = load_ebm(ebm_url)
        log_torch_model(ebm, "ebm", (ebm.channels, ebm.image_size, ebm.image_size))
