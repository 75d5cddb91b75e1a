"""Run by tests/test_faults.py in a process of its own: EBM training on a two-node Ray cluster on
this machine (one CPU each, one worker on each); one node is killed mid-run. Prints one JSON line."""
import glob
import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from distributed_ebm.config import TrainEBMConfig, build
from distributed_ebm.store.data import read_parquet, select
from distributed_ebm.distributed.train import train_ebm_on_ray
from tests.conftest import QUICK_NODE_DEATH, TEST_EXACT


def main(out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": QUICK_NODE_DEATH})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = build(TrainEBMConfig, {
        "ebm": {"width": 4}, "langevin": {"steps": 5}, "iterations": 100_000, "batch_size": 8, "bank_size": 32,
        "checkpoint_every": 5, "log_every": 5, "output": out, "name": "twonode", "mlflow": {"enabled": False},
        "ray": {"workers": 2, "max_failures": 3, "startup_timeout_s": 5, "shared_filesystem": True}})
    box = {}

    def target():
        try:
            train_ebm_on_ray(cfg, data=select(read_parquet(TEST_EXACT), count=64), show=False)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            box["error"] = f"{type(err).__name__}: {err}"
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + 240
    while not glob.glob(os.path.join(out, "twonode", "checkpoint_0*", "ckpt.pt")) and time.time() < deadline:
        time.sleep(0.5)
    killed = time.time()
    cluster.remove_node(node, allow_graceful=False)
    thread.join(timeout=180)
    print(json.dumps({"finished": not thread.is_alive(), "seconds_after_kill": time.time() - killed,
                      "error": box.get("error")}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
