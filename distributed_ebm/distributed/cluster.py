"""Connecting to Ray: the cluster at RAY_ADDRESS / the configured address, or a new local one."""
from __future__ import annotations

import json
import logging
import os
import sys


def _set_by_job() -> set[str]:
    """Variables a submitted job's runtime env already sets (`ray job submit --runtime-env-json`):
    its workers get them anyway, and ray.init refuses a runtime env that sets them a second time."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def connect(address: str | None = None):
    """ray.init once per process; environment variables (AWS_*, MLFLOW_*) reach the workers.
    The workers' and Ray's own output stays in Ray's log files unless DEBM_VERBOSE=1 (`--verbose`):
    the driver prints one progress line per job."""
    import ray

    if not ray.is_initialized():
        verbose = os.environ.get("DEBM_VERBOSE") == "1"
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's print once, not twice
        by_job = _set_by_job()
        forward = {k: v for k, v in os.environ.items() if k not in by_job and
                   (k.startswith(("AWS_", "MLFLOW_", "DEBM_")) or k in ("OMP_NUM_THREADS", "RAY_TRAIN_ENABLE_PRINT_PATCH"))}
        ray.init(address=address, runtime_env={"env_vars": forward} if forward else None,
                 log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                 ignore_reinit_error=True)
        if not verbose:
            import ray.data

            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we chose it
        print(f"Ray: {address or os.environ.get('RAY_ADDRESS') or 'a new local Ray'}; its logs: {_logs_dir()}"
              + ("" if verbose else " (--verbose prints them here)"), file=sys.stderr, flush=True)
    return ray


def _logs_dir() -> str:
    try:
        from ray._private.worker import _global_node
        return _global_node.get_logs_dir_path()
    except Exception:  # a private API: fall back to Ray's default place
        return "/tmp/ray/session_latest/logs"


def available(resource: str) -> float:
    import ray

    return float(ray.cluster_resources().get(resource, 0.0))
