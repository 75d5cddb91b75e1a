"""Which devices a job's Ray workers and actors run on: what the user asked for, never a snapshot.

A job names its GPUs (`ray.use_gpu: true` for training, `ray.gpus_per_actor: 1` for attacks) or leaves them to
`auto` (null). The decision reads what the cluster's nodes hold now and, where an autoscaler can add nodes, the
node types it may launch (the cluster launcher's config on the head node, `~/ray_bootstrap_config.yaml`, or the
file `DEBM_AUTOSCALER_CONFIG` names):
- asked for GPUs: a node that holds them now runs it; else, if the autoscaler has a node type with them, the
  job waits for it (saying so); else it fails at once with one line (not after `ray.startup_timeout_s`, and
  no actor pool waits forever);
- auto: GPUs where a node holds them now or a node type can bring them, else the CPU;
- the job's first line after connecting says which devices it runs on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from ..errors import InputError

BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # what `ray up` leaves on the head node for its autoscaler


@dataclass
class Plan:
    gpus: float  # per worker or actor (0: CPU only)
    waits: bool  # for nodes the autoscaler has yet to add
    where: str  # the first line's words: "CPU", "GPU (...)"


def node_types(path: str | None = None) -> list[dict] | None:
    """The resources of each node type an autoscaler may launch, or None where no autoscaler config is found."""
    path = os.path.expanduser(path or os.environ.get("DEBM_AUTOSCALER_CONFIG") or BOOTSTRAP)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            types = (yaml.safe_load(f) or {}).get("available_node_types") or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"autoscaler config {path} is not readable YAML ({type(err).__name__})") from None
    return [{k: float(v) for k, v in (t.get("resources") or {}).items()}
            for t in types.values() if (t.get("max_workers", 1) or 0) > 0]


def plan(asked: float | None, key: str, nodes: list[dict], types: list[dict] | None, auto: float = 1.0) -> Plan:
    """GPUs per worker/actor for a request `asked` (None: auto, then `auto` GPUs where there are any; 0: CPU),
    given the alive nodes' resources and the autoscaler's node types (None: no autoscaler)."""
    want = auto if asked is None else asked
    if not want:
        return Plan(0.0, False, "CPU")
    now = any(n.get("GPU", 0.0) >= want for n in nodes)
    later = bool(types) and any(t.get("GPU", 0.0) >= want for t in types)
    if now or later:
        count = f"{want:g} GPU each"
        return Plan(want, not now, f"GPU ({count}" + (", on nodes the autoscaler is to add)" if not now else ")"))
    if asked is None:
        return Plan(0.0, False, "CPU (the cluster has no GPU and no autoscaler that could add one)")
    biggest = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    raise InputError(f"{key} = {asked:g}: no node of this cluster can provide {asked:g} GPU (the most any alive node "
                     f"holds: {biggest:g}), and " + ("its autoscaler has no node type that could"
                                                    if types is not None else "it has no autoscaler that could add one"))


def alive_nodes() -> list[dict]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def cluster_plan(asked: float | None, key: str, auto: float = 1.0) -> Plan:
    """`plan` for the connected cluster."""
    return plan(asked, key, alive_nodes(), node_types(), auto)
