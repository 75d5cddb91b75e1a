"""EBM training throughput and where an iteration's time goes: the single-process loop against Ray Train with 1
and 2 workers, at several batch sizes per worker; per iteration, the chains (K Langevin steps), the bank (lease and
return through the replay-buffer actors) and the update (data, DDP all-reduce, optimizer step).

Same settings for all (paper network, width 32; K Langevin steps), one after the other in one process. Figures are
window means inside the loop (the last log window), so Ray's start-up (~15 s per fit, reported separately) is
excluded.

    python benchmarks/train.py --iterations 40 --steps 20 --per-worker 16 50
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from distributed_ebm.config import TrainEBMConfig, load_config  # noqa: E402
from distributed_ebm.distributed.train import train_ebm_on_ray  # noqa: E402
from distributed_ebm.local.train import LocalTraining  # noqa: E402
from distributed_ebm.method.training import time_split  # noqa: E402
from distributed_ebm.store.data import read_images  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=100, help="the single process's batch")
    p.add_argument("--per-worker", type=int, nargs="+", default=[16, 50], help="batch sizes per Ray Train worker")
    p.add_argument("--width", type=int, default=32)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="debm-bench-train-")
    common = [f"iterations={a.iterations}", f"langevin.steps={a.steps}", f"batch_size={a.batch}",
              f"ebm.width={a.width}", "bank_size=10000", f"log_every={a.iterations // 2}",
              f"checkpoint_every={a.iterations}", f"output={tmp}", "mlflow.enabled=false"]
    cfg = load_config(TrainEBMConfig, "jobs/configs/train_ebm_cpu.yaml", common + ["name=single"])
    data = read_images(cfg.data)

    run = LocalTraining(cfg, data)
    run.step()  # warm-up
    t = time.perf_counter()
    for _ in range(a.iterations // 2):
        run.step()
    single = (a.iterations // 2) / (time.perf_counter() - t)
    print(f"single process (2 threads): {single:.3f} it/s", flush=True)

    print("workers  batch/worker  batch  it/s   chains ms  bank ms  update ms  step ms  chains/bank/update  fit wall s")
    for per_worker in a.per_worker:
        for workers in (1, 2):
            c = load_config(TrainEBMConfig, "jobs/configs/train_ebm_cpu.yaml", common + [
                f"name=ray{workers}-{per_worker}", f"ray.workers={workers}", f"batch_size={workers * per_worker}"])
            t = time.perf_counter()
            out = train_ebm_on_ray(c, data=data, show=False)
            wall = time.perf_counter() - t
            ms = {k: 1000 * out[f"{k}_seconds"] for k in ("chain", "bank", "update", "step")}
            print(f"{workers:7d}  {per_worker:12d}  {workers * per_worker:5d}  {out['iterations_per_second']:5.2f}  "
                  f"{ms['chain']:9.1f}  {ms['bank']:7.1f}  {ms['update']:9.1f}  {ms['step']:7.1f}  "
                  f"{time_split(out):>18}  {wall:10.1f}", flush=True)


if __name__ == "__main__":
    main()
