"""What the EBM and the classifier Ray Train runs share: the TorchTrainer set-up, MLflow around it,
and the collective helpers their worker loops use."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .. import storage
from .cluster import available


def run_dir(cfg) -> str:
    """Where a run lives: Ray Train's folder for `name` under `output` (checkpoints, ebm.pt, ...)."""
    return storage.join(cfg.output, cfg.name)


def collective_device(device: torch.device | str, backend: str | None = None) -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only (on the worker's own
    `device`), gloo CPU tensors. `backend` defaults to the process group's (`dist.get_backend()`)."""
    backend = backend if backend is not None else dist.get_backend()
    if backend == "nccl":
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the nccl backend reduces CUDA tensors; this worker's device is {device}")
        return device
    return torch.device("cpu")


def all_reduce(values: list[float], device: torch.device | str, op=dist.ReduceOp.SUM) -> list[float]:
    """`op` over every worker of each value, in float64, on the process group's device."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(t, op=op)
    return t.tolist()


def barrier(world: int, device: torch.device | str = "cpu") -> None:
    if world > 1:
        d = collective_device(device)
        dist.barrier(device_ids=[d.index] if d.type == "cuda" and d.index is not None else None)


def mean_over_workers(values: list[float], world: int, device: torch.device | str = "cpu") -> list[float]:
    """The mean over workers of each value; `device` is this worker's (used by NCCL)."""
    if world == 1:
        return [float(v) for v in values]
    return [v / world for v in all_reduce(values, device)]


def all_workers(world: int, device: torch.device | str = "cpu"):
    """`agree(flag) -> bool`: true only when the flag is true on every worker (so all stop or none);
    `device` is this worker's (used by NCCL)."""
    def agree(flag: bool) -> bool:
        if world == 1:
            return flag
        return all_reduce([1.0 if flag else 0.0], device, dist.ReduceOp.MIN)[0] == 1.0
    return agree


def use_gpu(cfg) -> bool:
    return cfg.ray.use_gpu if cfg.ray.use_gpu is not None else available("GPU") >= cfg.ray.workers


def fit(loop, cfg, config: dict):
    """A TorchTrainer over `loop`: resumes a run of the same name and output, restarts failed workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path = cfg.output if "://" in cfg.output else os.path.abspath(cfg.output)
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=use_gpu(cfg),
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints)))
    return trainer.fit()


def fit_tracked(loop, cfg, config: dict, job: str, log_final=None):
    """`fit` inside one MLflow run per job (continued when the job resumes); rank 0 logs to it by
    run id, and `log_final(mlflow, result)` adds the final model."""
    if not cfg.mlflow.enabled:
        return fit(loop, cfg, config)
    from ..tracking import mlflow_run, tracking_uri

    id_url = storage.join(run_dir(cfg), "mlflow_run_id")
    run_id = storage.read_bytes(id_url).decode().strip() if storage.exists(id_url) else None
    with mlflow_run(cfg.mlflow, f"{job}:{cfg.name}", cfg.model_dump(mode="json"),
                    tags={"job": job, "output": run_dir(cfg)}, run_id=run_id) as mlflow:
        run_id = mlflow.active_run().info.run_id
        storage.write_bytes(id_url, run_id.encode())
        result = fit(loop, cfg, {**config, "mlflow": {"uri": tracking_uri(cfg.mlflow), "run_id": run_id}})
        if log_final and not result.error:
            log_final(mlflow, result)
    return result


def worker_logger(config: dict, rank: int):
    """Rank 0's MLflow logger, when the run is tracked."""
    if rank != 0 or not config.get("mlflow"):
        return None
    from ..tracking import RunLogger
    return RunLogger(**config["mlflow"])
