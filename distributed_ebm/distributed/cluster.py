"""Connecting to Ray: the cluster at RAY_ADDRESS / the configured address, or a new local one."""
from __future__ import annotations

import os


def connect(address: str | None = None):
    """ray.init once per process; environment variables (AWS_*, MLFLOW_*) reach the workers."""
    import ray

    if not ray.is_initialized():
        forward = {k: v for k, v in os.environ.items()
                   if k.startswith(("AWS_", "MLFLOW_", "DEBM_")) or k in ("OMP_NUM_THREADS",)}
        ray.init(address=address, runtime_env={"env_vars": forward} if forward else None,
                 log_to_driver=True, ignore_reinit_error=True)
    return ray


def available(resource: str) -> float:
    import ray

    return float(ray.cluster_resources().get(resource, 0.0))
