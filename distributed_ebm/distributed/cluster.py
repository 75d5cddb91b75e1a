"""Connecting to Ray: the cluster at RAY_ADDRESS / the configured address, or a new local one."""
from __future__ import annotations

import json
import os


def _set_by_job() -> set[str]:
    """Variables a submitted job's runtime env already sets (`ray job submit --runtime-env-json`):
    its workers get them anyway, and ray.init refuses a runtime env that sets them a second time."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def connect(address: str | None = None):
    """ray.init once per process; environment variables (AWS_*, MLFLOW_*) reach the workers."""
    import ray

    if not ray.is_initialized():
        by_job = _set_by_job()
        forward = {k: v for k, v in os.environ.items() if k not in by_job and
                   (k.startswith(("AWS_", "MLFLOW_", "DEBM_")) or k in ("OMP_NUM_THREADS",))}
        ray.init(address=address, runtime_env={"env_vars": forward} if forward else None,
                 log_to_driver=True, ignore_reinit_error=True)
    return ray


def available(resource: str) -> float:
    import ray

    return float(ray.cluster_resources().get(resource, 0.0))
