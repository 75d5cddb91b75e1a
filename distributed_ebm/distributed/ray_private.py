"""Every place the project relies on Ray beyond its public API (Ray 2.60), in one module: what each is for, and
why no public API serves. tests/test_ray_private.py fails loudly when a Ray upgrade moves one of them.

- the start-up bound of a Ray Train run: the variable Ray Train's controller reads (documented in Ray Train's
  debugging guide; its name is held in a private module) and the two errors it raises when the workers cannot be
  placed in time (no public class);
- whether an autoscaler runs: the v2 autoscaler reports to the GCS (public: ray.autoscaler.v2.sdk), the v1 monitor
  (the cluster launcher's, KubeRay's by default) only leaves its status in the GCS's internal key-value store, and
  runs on every cluster: without an autoscaling config it names each node's type after the node itself
  (`node_<id>`, ray.autoscaler._private.util.format_readonly_node_type), and adds none;
- how many actors read a Parquet read's footers: Ray Data 2.60 starts 32 per read and reads only the variable
  below (read_parquet and DataContext have no setting for it);
- the logger of Ray Data's progress bars, silenced when the project prints its own progress line;
- a lost actor that Ray could not rebuild as an error: Ray Data's reader re-raises it as an
  UnserializableException whose text names the original class (lost errors are otherwise recognized by class,
  through ray.exceptions, in distributed/attack.py).
"""
from __future__ import annotations

DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
PARQUET_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"  # read by the process that plans the read


def train_start_timeout_env() -> str:
    """The variable Ray Train's controller reads for how long a (re)started worker group may take to start."""
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    return WORKER_GROUP_START_TIMEOUT_S_ENV_VAR


def train_startup_errors() -> tuple[type, ...]:
    """What Ray Train raises (inside ControllerError) when its workers cannot be placed or started."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    return WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError


def logs_dir() -> str:
    """This Ray session's logs folder, from the public runtime context (Ray's default place before a session)."""
    import os

    import ray

    if not ray.is_initialized():
        return "/tmp/ray/session_latest/logs"
    ctx = ray.get_runtime_context()
    return os.path.join(ctx.get_temp_dir(), ctx.get_session_name(), "logs")


AUTOSCALING_STATUS_KEY = b"__autoscaling_status"  # ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS


def autoscaler_runs() -> bool:
    """Whether an autoscaler that can add nodes serves the connected cluster: the v2 autoscaler has reported its
    state to the GCS, or the v1 monitor's status there names node types of a config (not one per node). False until
    the monitor's first report, seconds after the head starts."""
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        if get_cluster_status(ray.get_runtime_context().gcs_address).stats.autoscaler_version not in (None, "", "0"):
            return True
    except Exception:  # noqa: BLE001 - an older GCS without the call: ask the v1 status below
        pass
    try:
        import json

        from ray.experimental.internal_kv import _internal_kv_get

        status = json.loads(_internal_kv_get(AUTOSCALING_STATUS_KEY) or b"{}")
        mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
        return any(kind != f"node_{node}" for node, kind in mapping.items())
    except Exception:  # noqa: BLE001 - unknown: as without one (the job fails at once instead of waiting)
        return False


def unserializable_lost(err: BaseException, names: tuple[str, ...]) -> bool:
    """Whether `err` is Ray's stand-in for an error it could not deserialize whose text names one of `names`."""
    from ray.exceptions import UnserializableException

    return isinstance(err, UnserializableException) and any(f"{n}:" in str(err) for n in names)
