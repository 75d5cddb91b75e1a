"""Run by tests/test_faults.py in a process of its own: an attack on a two-node Ray cluster on this
machine (one CPU each, one attack actor on each); the worker node is killed once the first batch's
records are written. Prints one JSON line: whether the run finished, its error, and how its records
compare with an uninterrupted single-process run's."""
import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from distributed_ebm.results import records as results
from distributed_ebm.config import AttackConfig, build
from distributed_ebm.errors import InputError
from distributed_ebm.distributed.attack import evaluate
from distributed_ebm.local.attack import run_attack
from distributed_ebm.store.weights import save_ebm
from tests.conftest import QUICK_NODE_DEATH, RESNET20, TEST_EXACT, tiny_ebm

IMAGES = 12


def config(out: str, ebm: str, shared: bool = False) -> AttackConfig:
    return build(AttackConfig, {
        "data": {"path": TEST_EXACT, "indices": list(range(IMAGES))},
        "classifier": {"arch": "resnet20", "weights": RESNET20}, "ebm": ebm, "purify": {"steps": 10, "noise": 0.05},
        "attack": {"mode": "bpda_eot", "eps": "1/255", "step_size": "0.5/255", "steps": 2, "eot_attack": 2,
                   "eot_defense": 2},
        "batch_size": 2, "seed": 5, "output": out, "mlflow": {"enabled": False},
        "ray": {"actors": 2, "shared_filesystem": shared}})


def compare(a, b) -> list[str]:
    """The columns where two record tables differ (rows in index order), [] if none."""
    a, b = a.sort_by("index"), b.sort_by("index")
    return [c for c in a.column_names if c in b.column_names and a.column(c).to_pylist() != b.column(c).to_pylist()]


def main(out: str) -> None:
    ebm = f"{out}/ebm.pt"
    save_ebm(tiny_ebm(scale=20), ebm)
    reference = results.read_records(run_attack(config(f"{out}/ref", ebm), device="cpu", show=False)["config"]["output"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": QUICK_NODE_DEATH})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:  # a local output on two nodes is refused unless the user vouches that every node shares it (as here)
        evaluate(config(f"{out}/refused", ebm), show=False)
        refused = None
    except InputError as err:
        refused = str(err)
    box = {}

    def target():
        try:
            box["summary"] = evaluate(config(f"{out}/ray", ebm, shared=True), show=False)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            box["error"] = f"{type(err).__name__}: {err}"
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not results.list_parts(f"{out}/ray") and time.time() < deadline:
        time.sleep(0.2)
    before = len(results.done_ids(f"{out}/ray"))
    killed = time.time()
    cluster.remove_node(node, allow_graceful=False)
    thread.join(timeout=150)
    got = results.read_records(f"{out}/ray") if results.list_parts(f"{out}/ray") else None
    ids = got.column("index").to_pylist() if got is not None else []
    print(json.dumps({"refused": refused, "finished": not thread.is_alive(), "seconds_after_kill": time.time() - killed,
                      "done_before_kill": before, "error": box.get("error"),
                      "images": box.get("summary", {}).get("images"), "ids": sorted(ids),
                      "differ": compare(got, reference) if got is not None else None}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
