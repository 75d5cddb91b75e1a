"""EBM training throughput: the single-process loop against Ray Train with 1 and 2 workers, and the
share of each iteration spent on the bank actors (lease + return).

Same settings for all (paper network, width 32; batch 100; K Langevin steps), one after the other
in one process. Iterations per second are measured inside the loop over the last log window
(`iterations_per_second`), so Ray's start-up (~15 s per fit, reported separately) is excluded.

    python benchmarks/train.py --iterations 40 --steps 20
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from distributed_ebm.config import TrainEBMConfig, load_config  # noqa: E402
from distributed_ebm.store.data import load  # noqa: E402
from distributed_ebm.distributed.train import train_ebm_on_ray  # noqa: E402
from distributed_ebm.local.train import LocalTraining  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--width", type=int, default=32)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="debm-bench-train-")
    common = [f"iterations={a.iterations}", f"langevin.steps={a.steps}", f"batch_size={a.batch}",
              f"ebm.width={a.width}", "bank_size=10000", f"log_every={a.iterations // 2}",
              f"checkpoint_every={a.iterations}", f"output={tmp}", "mlflow.enabled=false"]
    cfg = load_config(TrainEBMConfig, "jobs/configs/train_ebm_cpu.yaml", common + ["name=single"])
    data = load(cfg.data)

    run = LocalTraining(cfg, data)
    run.step()  # warm-up
    t = time.perf_counter()
    for _ in range(a.iterations // 2):
        run.step()
    single = (a.iterations // 2) / (time.perf_counter() - t)
    print(f"single process (2 threads): {single:.3f} it/s", flush=True)

    rows = []
    for workers in (1, 2):
        c = load_config(TrainEBMConfig, "jobs/configs/train_ebm_cpu.yaml",
                        common + [f"name=ray{workers}", f"ray.workers={workers}"])
        t = time.perf_counter()
        out = train_ebm_on_ray(c, data=data, show=False)
        wall = time.perf_counter() - t
        rows.append((workers, out["iterations_per_second"], out["bank_share"], wall))
        print(f"ray {workers} worker(s): {out['iterations_per_second']:.3f} it/s in the loop, bank share "
              f"{100 * out['bank_share']:.2f}%, fit wall {wall:.1f} s for {a.iterations} iterations", flush=True)
    print(" ".join([f"single={single:.3f}"] + [f"ray{w}={r:.3f} bank{w}={100 * b:.2f}%" for w, r, b, _ in rows]))


if __name__ == "__main__":
    main()
