"""Fixed and per-batch overhead of the Ray Data evaluation engine with 1, 8 and 32 actors.

The attack is made nearly free (mode `defense`: one natural prediction, one purification step with
a width-4 EBM, one chain), so the wall time is the engine's own: actor start-up (each loads the
classifier and the EBM), scheduling, the object store, the driver's loop and the record writes.
Actors get fractional CPUs (total CPUs / actors). For each pool size two jobs of B1 and B2 batches
(one image each) run; per-batch overhead = (t2 - t1) / (B2 - B1), fixed overhead = t1 - B1 * that.

    python benchmarks/engine_overhead.py --actors 1 8 32 --batches 32 128
One line per pool size: `actors=A fixed_s=... per_batch_ms=... batches_per_s=...`.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from distributed_ebm.config import AttackConfig, load_config  # noqa: E402
from distributed_ebm.distributed.attack import RayActors  # noqa: E402
from distributed_ebm.method.nets import EBM  # noqa: E402
from distributed_ebm.recipes.attack import run_attack  # noqa: E402
from distributed_ebm.store.checkpoints import save_ebm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--actors", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batches", type=int, nargs=2, default=[32, 128])
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="debm-ovh-")
    torch.manual_seed(0)
    save_ebm(EBM(width=4), f"{tmp}/ebm.pt")
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, _temp_dir=f"{tmp}/ray")
    for actors in a.actors:
        seconds = []
        for batches in a.batches:
            cfg = load_config(AttackConfig, "jobs/configs/attack_bpda_eot.yaml", [
                f"ebm={tmp}/ebm.pt", "attack.mode=defense", "attack.reevaluations=0", "attack.eot_defense=1",
                "purify.steps=1", f"data.count={batches}", "batch_size=1", f"output={tmp}/out-{actors}-{batches}",
                f"ray.actors={actors}", f"ray.cpus_per_actor={a.cpus / actors:g}", "ray.gpus_per_actor=0",
                "mlflow.enabled=false"])
            seconds.append(run_attack(cfg, RayActors(), show=False)["seconds"])
        per_batch = (seconds[1] - seconds[0]) / (a.batches[1] - a.batches[0])
        fixed = seconds[0] - a.batches[0] * per_batch
        print(f"actors={actors} cpus_per_actor={a.cpus / actors:g} t{a.batches[0]}={seconds[0]:.1f}s "
              f"t{a.batches[1]}={seconds[1]:.1f}s fixed_s={fixed:.1f} per_batch_ms={1000 * per_batch:.1f} "
              f"batches_per_s={1 / per_batch if per_batch > 0 else float('inf'):.1f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
