"""What the EBM and the classifier Ray Train runs share: the TorchTrainer set-up, MLflow around it,
and the collective helpers their worker loops use."""
from __future__ import annotations

import os
import sys
import threading

import torch
import torch.distributed as dist

from ..errors import JobFailed
from ..progress import ProgressBoard, Reporter, follow
from ..store import storage
from .devices import Plan, cluster_plan, ready
from .ray_private import train_start_timeout_env, train_startup_errors


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


REHEARSAL_CPU = "DEBM_REHEARSAL_CPU"


def rehearsal_cpu() -> bool:
    """DEBM_REHEARSAL_CPU=1: workers that hold a logical GPU without CUDA behind it (Ray's fake multinode provider,
    tests/test_rehearsal.py) train on the CPU with gloo. For rehearsals of a GPU cluster only."""
    return os.environ.get(REHEARSAL_CPU) == "1"


def worker_device(config: dict) -> torch.device:
    """A Ray Train worker's device: its GPU where it holds one (Ray Train's choice), the CPU in a rehearsal."""
    import ray.train.torch

    return torch.device("cpu") if config.get("rehearsal_cpu") else ray.train.torch.get_device()


def prepare_model(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """Ray Train's DDP wrapping (onto the worker's device); in a rehearsal, DDP on the CPU as Ray Train wraps a
    CPU worker's model (it would move the model to the logical GPU's CUDA device, which does not exist)."""
    import ray.train.torch

    if config.get("rehearsal_cpu"):
        return torch.nn.parallel.DistributedDataParallel(model)
    return ray.train.torch.prepare_model(model)


def device_plan(cfg) -> Plan:
    """Where the workers run: `ray.use_gpu` true (one GPU each), false, or null (auto); devices.py decides."""
    asked = None if cfg.ray.use_gpu is None else float(cfg.ray.use_gpu)
    return cluster_plan(asked, "ray.use_gpu")


class CapacityLost(JobFailed):
    """The workers could not be placed within ray.startup_timeout_s (a lost node, too few resources), plus
    ray.provision_timeout_s where an autoscaler may add the nodes."""


class WorkerProgress(Reporter):
    """`update(n, **metrics)` on every worker; rank 0 posts to the run's board (a `ProgressBoard` actor)."""

    def __init__(self, config: dict, rank: int, total: int, name: str, start: int):
        board = config.get("board") if rank == 0 else None
        super().__init__(total, name, start, post=board.post.remote if board is not None else None,
                         started=board.started.remote if board is not None else None)


def fit(loop, cfg, config: dict):
    """A TorchTrainer over `loop`: resumes a run of the same name and output, restarts failed workers.
    Workers no node can hold are refused at once; nodes an autoscaler is to add are waited for, at most
    `ray.provision_timeout_s` (devices.ready). A worker group that cannot be placed within `ray.startup_timeout_s`
    (plus `ray.provision_timeout_s` where an autoscaler replaces a lost node) fails the run (CapacityLost) instead
    of Ray Train's default of retrying start-up forever. The driver prints the run's progress (rank 0 posts it to
    a `ProgressBoard`)."""
    import ray
    from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    start_timeout_env = train_start_timeout_env()

    devices = device_plan(cfg)
    print(f"{cfg.name}: {cfg.ray.workers} Ray Train worker(s) on {devices.where}", file=sys.stderr, flush=True)
    grows = ready(cfg.ray.cpus_per_worker, devices.gpus, {"CPU": "ray.cpus_per_worker", "GPU": "ray.use_gpu"},
                  cfg.ray.provision_timeout_s, cfg.name, count=cfg.ray.workers, count_key="ray.workers")
    start_timeout = cfg.ray.startup_timeout_s + (cfg.ray.provision_timeout_s if grows else 0.0)
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    rehearsal = bool(devices.gpus) and rehearsal_cpu()
    config = {**config, "board": board, "rehearsal_cpu": rehearsal}

    storage_path = cfg.output if "://" in cfg.output else os.path.abspath(cfg.output)
    trainer = TorchTrainer(
        loop, train_loop_config=config, torch_config=TorchConfig(backend="gloo") if rehearsal else None,
        scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=devices.gpus > 0,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                                          controller_failure_limit=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints)))
    # Ray Train hands this variable on to its controller, which waits that long for the workers
    before = os.environ.get(start_timeout_env)
    os.environ[start_timeout_env] = str(start_timeout)
    stop = threading.Event()
    follower = threading.Thread(target=follow, args=(lambda: ray.get(board.read.remote(), timeout=10), stop),
                                daemon=True)
    follower.start()
    try:
        return trainer.fit()
    except ControllerError as err:
        if not isinstance(err.controller_failure, train_startup_errors()):
            raise
        need = f"{cfg.ray.cpus_per_worker:g} CPU" + (" and 1 GPU" if devices.gpus else "")
        raise CapacityLost(f"{cfg.ray.workers} workers ({need} each, ray.workers) could not be placed within "
                           f"ray.startup_timeout_s={cfg.ray.startup_timeout_s:g} s"
                           + (f" + ray.provision_timeout_s={cfg.ray.provision_timeout_s:g} s" if grows else "")
                           + f" (a lost node, or too few free resources); the last checkpoint is in {run_dir(cfg)}") \
            from None
    finally:
        stop.set()
        follower.join()
        ray.kill(board)
        if before is None:
            os.environ.pop(start_timeout_env, None)
        else:
            os.environ[start_timeout_env] = before


def fit_tracked(loop, cfg, config: dict, job: str, log_final=None):
    """`fit` inside one MLflow run per job (continued when the job resumes); rank 0 logs to it by
    run id, and `log_final()` adds the final model to it."""
    if not cfg.mlflow.enabled:
        return fit(loop, cfg, config)
    from ..store.tracking import mlflow_run, tracking_uri
    from .cluster import check_tracking_reach

    check_tracking_reach(tracking_uri(cfg.mlflow), cfg.ray.shared_filesystem)
    id_url = storage.join(run_dir(cfg), "mlflow_run_id")
    run_id = storage.read_bytes(id_url).decode().strip() if storage.exists(id_url) else None
    with mlflow_run(cfg.mlflow, f"{job}:{cfg.name}", cfg.model_dump(mode="json"),
                    tags={"job": job, "output": run_dir(cfg)}, run_id=run_id) as mlflow:
        run_id = mlflow.active_run().info.run_id
        storage.write_bytes(id_url, run_id.encode())
        result = fit(loop, cfg, {**config, "mlflow": {"uri": tracking_uri(cfg.mlflow), "run_id": run_id}})
        if log_final and not result.error:
            log_final()
    return result


class SafeLogger:
    """A worker's MLflow logger that cannot fail the run: an MLflow outage costs metrics, never the training. The
    first failure is printed (once), the calls after it are still tried."""

    def __init__(self, make):
        self.logger, self.warned = None, False
        self._call(lambda: setattr(self, "logger", make()))

    def _call(self, fn) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - anything MLflow or its store raises
            if not self.warned:
                self.warned = True
                first = (str(err).strip().splitlines() or [""])[0][:200]
                print(f"mlflow: logging failed ({type(err).__name__}: {first}); training goes on without these "
                      "metrics", file=sys.stderr, flush=True)

    def metrics(self, values: dict, step: int) -> None:
        if self.logger is not None:
            self._call(lambda: self.logger.metrics(values, step))

    def file(self, name: str, data: bytes, folder: str | None = None) -> None:
        if self.logger is not None:
            self._call(lambda: self.logger.file(name, data, folder))


def worker_logger(config: dict, rank: int):
    """Rank 0's MLflow logger, when the run is tracked; its failures are warned about, never raised."""
    if rank != 0 or not config.get("mlflow"):
        return None
    from ..store.tracking import RunLogger
    return SafeLogger(lambda: RunLogger(**config["mlflow"]))
