"""Which devices a job's Ray workers and actors run on: what the user asked for, never a snapshot.

A job names its GPUs (`ray.use_gpu: true` for training, `ray.gpus_per_actor: 1` for attacks) or leaves them to
`auto` (null). The decision reads what the cluster's nodes hold now and, where an autoscaler can add nodes, the
node types it may launch (the cluster launcher's config on the head node, `~/ray_bootstrap_config.yaml`, or the
file `DEBM_AUTOSCALER_CONFIG` names). An autoscaler that runs without such a file (KubeRay's, which reads its
node types from the RayCluster resource) is found through the GCS, but does not say what it can add:
- asked for GPUs: a node that holds them now runs it; else, if the autoscaler has a node type with them or runs
  without saying what it can add, the job waits for it (saying so, at most `ray.provision_timeout_s`); else it
  fails at once with one line;
- auto: GPUs where a node holds them now or a known node type can bring them, else the CPU;
- a worker or actor no node and no node type can hold (CPUs as GPUs), or more workers than a cluster that cannot
  grow holds, fails at once with one line naming the field (`check_fits`), instead of waiting forever;
- the job's first line after connecting says which devices it runs on.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import yaml

from ..errors import InputError, JobFailed

BOOTSTRAP = "~/ray_bootstrap_config.yaml"  # what `ray up` leaves on the head node for its autoscaler


@dataclass
class Plan:
    gpus: float  # per worker or actor (0: CPU only)
    waits: bool  # for nodes the autoscaler has yet to add
    where: str  # the first line's words: "CPU", "GPU (...)"


@dataclass
class Capacity:
    nodes: list[dict]  # the alive nodes' resources
    types: list[tuple[dict, int]] | None  # (resources, most nodes) of each type the autoscaler may add; None: unknown
    grows: bool  # an autoscaler runs: nodes may come (and go)


class NotProvisioned(JobFailed):
    """The autoscaler added no node for the job's workers or actors within `ray.provision_timeout_s`."""


def type_limits(path: str | None = None) -> list[tuple[dict, int]] | None:
    """(resources, most nodes) of each node type an autoscaler may launch, or None where no autoscaler config is
    found."""
    path = os.path.expanduser(path or os.environ.get("DEBM_AUTOSCALER_CONFIG") or BOOTSTRAP)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            types = (yaml.safe_load(f) or {}).get("available_node_types") or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"autoscaler config {path} is not readable YAML ({type(err).__name__})") from None
    return [({k: float(v) for k, v in (t.get("resources") or {}).items()}, int(t.get("max_workers", 1) or 0))
            for t in types.values() if (t.get("max_workers", 1) or 0) > 0]


def node_types(path: str | None = None) -> list[dict] | None:
    """The resources of each node type an autoscaler may launch, or None where no autoscaler config is found."""
    limits = type_limits(path)
    return None if limits is None else [resources for resources, _ in limits]


def plan(asked: float | None, key: str, nodes: list[dict], types: list[dict] | None, auto: float = 1.0,
         grows: bool = False) -> Plan:
    """GPUs per worker/actor for a request `asked` (None: auto, then `auto` GPUs where there are any; 0: CPU),
    given the alive nodes' resources, the autoscaler's node types (None: not known) and whether an autoscaler runs
    (`grows`; a known node type implies one)."""
    want = auto if asked is None else asked
    if not want:
        return Plan(0.0, False, "CPU")
    now = any(n.get("GPU", 0.0) >= want for n in nodes)
    later = bool(types) and any(t.get("GPU", 0.0) >= want for t in types)
    if now or later:
        count = f"{want:g} GPU each"
        return Plan(want, not now, f"GPU ({count}" + (", on nodes the autoscaler is to add)" if not now else ")"))
    if types is None and grows:
        if asked is not None:
            return Plan(want, True, f"GPU ({want:g} GPU each, on nodes asked of the autoscaler, which does not say "
                                    "what it can add)")
        return Plan(0.0, False, "CPU (no node has a GPU now, and the autoscaler does not say whether it can add "
                                f"one: name {key} to wait for one)")
    if asked is None:
        return Plan(0.0, False, "CPU (the cluster has no GPU and no autoscaler that could add one)")
    biggest = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    raise InputError(f"{key} = {asked:g}: no node of this cluster can provide {asked:g} GPU (the most any alive node "
                     f"holds: {biggest:g}), and " + ("its autoscaler has no node type that could"
                                                    if types is not None
                                                    else "it has no autoscaler that could add one"))


def _slots(resources: dict, bundle: dict) -> int:
    """How many `bundle`s one node of `resources` holds."""
    return min((math.floor(resources.get(r, 0.0) / v + 1e-9) for r, v in bundle.items() if v > 0), default=0)


def check_fits(bundle: dict, keys: dict, cap: Capacity, count: int = 1, count_key: str | None = None) -> None:
    """Fail at once, naming the field, where no alive node and no node type the autoscaler may add holds one
    `bundle` ({"CPU": c, "GPU": g} per worker or actor; `keys` names each resource's setting), or where a cluster
    that cannot grow holds fewer than `count` of them (`count_key`). An autoscaler that does not say what it can
    add is trusted (the job waits for it, bounded)."""
    types = [t for t, _ in cap.types or []]
    unknown = cap.grows and cap.types is None
    if not unknown and not any(_slots(r, bundle) for r in cap.nodes + types):
        def largest(r: str) -> tuple[float, float]:
            return (max((n.get(r, 0.0) for n in cap.nodes), default=0.0),
                    max((t.get(r, 0.0) for t in types), default=0.0))
        over = [(r, v) for r, v in bundle.items() if v > max(largest(r))]
        r, v = over[0] if over else next((r, v) for r, v in bundle.items() if v > 0)  # else: not together
        most, most_type = largest(r)
        offers = f"the largest alive node has {most:g}" + (f", the autoscaler's largest node type {most_type:g}"
                                                           if types else "")
        together = "" if v > max(most, most_type) else " together with " + ", ".join(
            f"{keys.get(o, o)} = {w:g}" for o, w in bundle.items() if o != r and w > 0)
        raise InputError(f"{keys.get(r, r)} = {v:g}: no node of this cluster can provide {v:g} {r}{together} "
                         f"({offers})")
    if count_key and not unknown:
        most = pool_limit(bundle, cap) or 0
        if most < count:
            need = ", ".join(f"{v:g} {r}" for r, v in bundle.items() if v > 0)
            raise InputError(f"{count_key} = {count}: this cluster can hold at most {most} of them ({need} each"
                             + (", its alive nodes and every node its autoscaler may add)" if cap.types else
                                ", its alive nodes, and it has no autoscaler)"))


def pool_limit(bundle: dict, cap: Capacity) -> int | None:
    """How many `bundle`s the cluster can hold at most: its alive nodes, and every node its autoscaler may add;
    None where an autoscaler runs without saying what it can add."""
    if cap.grows and cap.types is None:
        return None
    return (sum(_slots(r, bundle) for r in cap.nodes)
            + sum(_slots(t, bundle) * n for t, n in cap.types or [])) or None


def provision(bundle: dict, count: int, cap: Capacity, timeout_s: float, what: str, grow_to: int = 0) -> None:
    """Wait, at most `timeout_s` (`ray.provision_timeout_s`), until the alive nodes can hold `count` `bundle`s,
    asking the autoscaler for them; a GPU node boots in minutes, longer than a worker group's start-up bound.
    Says what it waits for; returns at once where the nodes are there or no autoscaler could add them.
    `grow_to`: an elastic pool's most; the autoscaler is asked for that many, and the request stays (the pool
    grows onto the nodes as they come; the caller withdraws it when the work ends)."""
    from ray.autoscaler.sdk import request_resources

    if not cap.grows:
        return
    asked = max(count, grow_to)
    if asked > sum(_slots(r, bundle) for r in cap.nodes):
        request_resources(bundles=[{r: v for r, v in bundle.items() if v > 0}] * asked)
    if sum(_slots(r, bundle) for r in cap.nodes) >= count:
        return
    need = ", ".join(f"{v:g} {r}" for r, v in bundle.items() if v > 0)
    more = f" (asked for {asked}: the pool grows onto the others as they come)" if asked > count else ""
    print(f"{what}: waiting up to ray.provision_timeout_s = {timeout_s:g} s for the autoscaler to add nodes for "
          f"{count} x ({need}){more}", file=sys.stderr, flush=True)
    deadline, t0 = time.monotonic() + timeout_s, time.monotonic()
    try:
        while True:
            nodes = alive_nodes()
            have = sum(_slots(r, bundle) for r in nodes)
            if have >= count:
                print(f"{what}: the nodes are there ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
                return
            if time.monotonic() > deadline:
                raise NotProvisioned(f"{what}: the autoscaler added no room for {count} x ({need}) within "
                                     f"ray.provision_timeout_s = {timeout_s:g} s (the alive nodes hold {have}); "
                                     "raise it, or look at the autoscaler's log (`ray status`)")
            time.sleep(1.0)
    finally:
        if asked == count:
            request_resources(bundles=[])  # the job's own tasks and actors hold the nodes from here


def alive_nodes() -> list[dict]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def capacity() -> Capacity:
    """What the connected cluster holds and may add."""
    from .ray_private import autoscaler_runs

    limits = type_limits()
    return Capacity(alive_nodes(), limits, limits is not None or autoscaler_runs())


def cluster_plan(asked: float | None, key: str, auto: float = 1.0) -> Plan:
    """`plan` for the connected cluster."""
    cap = capacity()
    return plan(asked, key, cap.nodes, None if cap.types is None else [t for t, _ in cap.types], auto, cap.grows)


def ready(cpus: float, gpus: float, keys: dict, timeout_s: float, what: str, count: int = 1,
          count_key: str | None = None, grow_to: int = 0) -> bool:
    """Before a job starts its workers or actors (`cpus`, `gpus` each): refuse what the cluster can never hold
    (`check_fits`), and wait, bounded, for nodes the autoscaler is to add (`provision`; `grow_to`: an elastic
    pool's most). Returns whether an autoscaler runs (a lost node's replacement then boots before a restarted job
    can be placed)."""
    cap = capacity()
    bundle = {"CPU": float(cpus), "GPU": float(gpus)}
    check_fits(bundle, keys, cap, count, count_key)
    provision(bundle, count, cap, timeout_s, what, grow_to)
    return cap.grows
