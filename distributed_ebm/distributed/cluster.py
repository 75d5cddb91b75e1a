"""Connecting to Ray: the cluster the user named (`ray.address` or RAY_ADDRESS), or a new local one.

Without a named address `ray.init()` would join whatever cluster an earlier `ray start` recorded
on the machine; we start our own instead (address="local"). A named host:port is probed first, so
an unreachable address fails within `CONNECT_TIMEOUT_S` with one line instead of ray.init's
minutes-long wait for the GCS.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys

from ..errors import InputError
from .ray_private import DATA_PROGRESS_LOGGER, logs_dir

CONNECT_TIMEOUT_S = 10.0


class ClusterUnreachable(InputError):
    """The named Ray address does not answer."""


def _set_by_job() -> set[str]:
    """Variables a submitted job's runtime env already sets (`ray job submit --runtime-env-json`):
    its workers get them anyway, and ray.init refuses a runtime env that sets them a second time."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "CREDENTIAL")


def secret(name: str) -> bool:
    """Whether a variable holds a credential (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD,
    ...): nodes get theirs from their instance role or service account (docs/cluster.md), not from the driver."""
    return any(word in name.upper() for word in SECRET_WORDS)


def target(address: str | None) -> tuple[str, str]:
    """(address for ray.init, where it came from): the configured one, RAY_ADDRESS, or "local"."""
    if address:
        return address, "ray.address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return "local", ""


def probe(address: str, source: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, naming the address, when nothing listens at a host:port address ("auto"/"local" pass)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterUnreachable(f"{source}={address}: no Ray cluster answers there "
                                 f"({err.strerror or err} within {timeout_s:g} s)") from None


def connect(address: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S):
    """ray.init once per process; environment variables (AWS_*, MLFLOW_*, DEBM_*) reach the workers, never a
    secret (`secret`): a job's runtime env is stored in the GCS and shown by the dashboard and `ray job` commands.
    The workers' and Ray's own output stays in Ray's log files unless DEBM_VERBOSE=1 (`--verbose`):
    the driver prints one progress line per job."""
    import ray

    verbose = os.environ.get("DEBM_VERBOSE") == "1"
    if not verbose:  # also on a Ray this process joined before (a notebook's, a test session's)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger(DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)  # "bars disabled": we chose it
    if not ray.is_initialized():
        where, source = target(address)
        if source:
            probe(where, source, timeout_s)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's print once, not twice
        by_job = _set_by_job()
        forward = {k: v for k, v in os.environ.items() if k not in by_job and not secret(k) and
                   (k.startswith(("AWS_", "MLFLOW_", "DEBM_"))
                    or k in ("OMP_NUM_THREADS", "RAY_TRAIN_ENABLE_PRINT_PATCH"))}
        ray.init(address=where, runtime_env={"env_vars": forward} if forward else None,
                 log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING,
                 ignore_reinit_error=True)
        print(f"Ray: {where if source else 'a new local Ray'}; its logs: {logs_dir()}"
              + ("" if verbose else " (--verbose prints them here)"), file=sys.stderr, flush=True)
    return ray


def available(resource: str) -> float:
    import ray

    return float(ray.cluster_resources().get(resource, 0.0))


def _many_nodes() -> str:
    """Why work may run on another node than the driver's ("" where it cannot): several alive nodes, or an
    autoscaler that may add some (a cluster of one head node at start grows)."""
    import ray

    from .ray_private import autoscaler_runs

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        return f"the cluster has {nodes} nodes"
    return "the cluster's autoscaler may add nodes" if autoscaler_runs() else ""


def check_one_storage(url: str, what: str, shared_filesystem: bool) -> None:
    """A local `url` on a cluster of several nodes, or one that can grow, fails with one line: bank shards, workers
    and actors on other nodes would each write their part to their own disk, and the driver (and a resume) would
    find part of the run. An object store (s3://...) is one storage for every node; so is a local path the user
    vouches for."""
    from ..store.storage import is_local

    if shared_filesystem or not is_local(url):
        return
    why = _many_nodes()
    if why:
        raise InputError(f"{what} {url} is a local path but {why}, each of which would write "
                         "to its own disk: use an object store (s3://...), or set ray.shared_filesystem=true if every "
                         "node mounts this path")


def check_tracking_reach(uri: str, shared_filesystem: bool) -> None:
    """A file-based MLflow store (sqlite:, file:, a path) that the driver resolved is opened by rank 0 or a Tune
    trial on whichever node it runs: on a cluster of several nodes, or one that can grow, that is another disk's
    store (or none). Refused with one line, as local outputs are."""
    if shared_filesystem or uri.startswith(("http://", "https://", "databricks")):
        return
    why = _many_nodes()
    if why:
        raise InputError(f"mlflow.tracking_uri {uri} is a file on the driver's disk but {why}, where workers would "
                         "open a store of their own: use an MLflow server (http://HOST:PORT), or set "
                         "ray.shared_filesystem=true if every node mounts its path")
