"""Run by tests/test_faults.py in a process of its own: two node losses on one two-node Ray cluster on this
machine (one CPU per node; one cluster for both, since its start and this process's imports are a third of
the time). First an attack, one attack actor on each node, whose worker node is killed once the first
batch's records are written; then, on a new worker node, EBM training with one Ray Train worker on each
node, whose worker node is killed after the first checkpoint. Prints one JSON line: for the attack, whether
it finished, its error and how its records compare with an uninterrupted single-process run's; for the
training, whether it finished and its error."""
import glob
import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from distributed_ebm.config import AttackConfig, TrainEBMConfig, build
from distributed_ebm.distributed.attack import RayActors
from distributed_ebm.distributed.train import train_ebm_on_ray
from distributed_ebm.errors import InputError
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.recipes.attack import run_attack
from distributed_ebm.results import records as results
from distributed_ebm.store.checkpoints import save_ebm
from distributed_ebm.store.data import read_parquet, subset
from tests.conftest import QUICK_NODE_DEATH, RESNET20, TEST_EXACT, tiny_ebm

IMAGES = 12


def attack_config(out: str, ebm: str, shared: bool = False) -> AttackConfig:
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


def in_thread(work):
    """`work()` in a thread; returns the thread and a box that gets its result or its error's line."""
    box = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            box["error"] = f"{type(err).__name__}: {err}"
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for(condition, timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.2)


def lose_a_node_in_an_attack(cluster: Cluster, node, out: str, reference) -> dict:
    ebm = f"{out}/ebm.pt"
    try:  # a local output on two nodes is refused unless the user vouches that every node shares it (as here)
        run_attack(attack_config(f"{out}/refused", ebm), RayActors(), show=False)
        refused = None
    except InputError as err:
        refused = str(err)
    thread, box = in_thread(lambda: run_attack(attack_config(f"{out}/ray", ebm, shared=True), RayActors(), show=False))
    wait_for(lambda: results.list_parts(f"{out}/ray"), 120)
    before = len(results.done_ids(f"{out}/ray"))
    killed = time.time()
    cluster.remove_node(node, allow_graceful=False)
    thread.join(timeout=150)
    got = results.read_records(f"{out}/ray") if results.list_parts(f"{out}/ray") else None
    ids = got.column("index").to_pylist() if got is not None else []
    return {"refused": refused, "finished": not thread.is_alive(), "seconds_after_kill": time.time() - killed,
            "done_before_kill": before, "error": box.get("error"), "images": box.get("result", {}).get("images"),
            "ids": sorted(ids), "differ": compare(got, reference) if got is not None else None}


def lose_a_node_in_training(cluster: Cluster, node, out: str) -> dict:
    cfg = build(TrainEBMConfig, {
        "ebm": {"width": 4}, "langevin": {"steps": 5}, "iterations": 100_000, "batch_size": 8, "bank_size": 32,
        "checkpoint_every": 5, "log_every": 5, "output": out, "name": "twonode", "mlflow": {"enabled": False},
        "ray": {"workers": 2, "max_failures": 3, "startup_timeout_s": 5, "shared_filesystem": True}})
    data = subset(read_parquet(TEST_EXACT), count=64)
    thread, box = in_thread(lambda: train_ebm_on_ray(cfg, data=data, show=False))
    wait_for(lambda: glob.glob(os.path.join(out, "twonode", "checkpoint_0*", "ckpt.pt")), 240)
    killed = time.time()
    cluster.remove_node(node, allow_graceful=False)
    thread.join(timeout=180)
    return {"finished": not thread.is_alive(), "seconds_after_kill": time.time() - killed, "error": box.get("error")}


def main(out: str) -> None:
    save_ebm(tiny_ebm(scale=20), f"{out}/ebm.pt")
    reference = results.read_records(run_attack(attack_config(f"{out}/ref", f"{out}/ebm.pt"), OneProcess("cpu"),
                                                show=False)["config"]["output"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": QUICK_NODE_DEATH})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        attack = lose_a_node_in_an_attack(cluster, cluster.add_node(num_cpus=1), out, reference)
        training = lose_a_node_in_training(cluster, cluster.add_node(num_cpus=1), f"{out}/training")
        print(json.dumps({"attack": attack, "training": training}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
