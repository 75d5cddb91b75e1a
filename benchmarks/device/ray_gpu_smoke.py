"""The Ray GPU path in one short run, on a machine with one GPU and no network (docs/gpu.md), or on the CPU.

    python3 benchmarks/device/ray_gpu_smoke.py --out DIR [--device cuda|cpu]

(a) the Ray Data engine with one actor (one GPU) on a few exact test images, its records against the same attack
    in one process (jobs/attack_local.py's engine) on the same device;
(b) Ray Train with one worker (one GPU, NCCL) for a few iterations of the paper's EBM;
(c) two attack actors sharing the GPU (ray.gpus_per_actor = 0.5), their records against (a)'s.
Everything in float32_strict (deterministic arithmetic), on a local Ray this job starts and stops. Prints one
table and writes DIR/ray_gpu_smoke.json. Runs from a bare checkout (the repository root goes on sys.path).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)

    import ray

    from distributed_ebm.config import AttackConfig, TrainEBMConfig, build, shared
    from distributed_ebm.distributed.attack import RayActors
    from distributed_ebm.distributed.train import train_ebm_on_ray
    from distributed_ebm.local.attack import OneProcess
    from distributed_ebm.recipes.attack import run_attack
    from distributed_ebm.results.records import read_records

    gpu = a.device == "cuda"
    report, t0 = {"device": a.device, "ray": ray.__version__, "torch": torch.__version__}, time.time()
    if gpu:
        report["gpu"] = torch.cuda.get_device_name(0)

    def attack(name, **ray_cfg):
        return build(AttackConfig, {
            "data": {"indices": [0, 1, 2, 3]}, "ebm": "models/ebm-cifar10-cpu/ebm.pt", "purify": {"steps": 20},
            "attack": {"mode": "bpda_eot", "steps": 2, "eot_attack": 4, "eot_defense": 8}, "batch_size": 2,
            "precision": "float32_strict", "output": f"{a.out}/{name}", "mlflow": {"enabled": False},
            "report": {"gallery": 0}, "ray": ray_cfg})

    def records(name):
        table = read_records(f"{a.out}/{name}")
        return [(r["index"], r["broken_at"], r["final_pred"], r["natural_defense_pred"]) for r in table.to_pylist()]

    def part(name, fn):
        t = time.time()
        try:
            report[name] = {**fn(), "seconds": round(time.time() - t, 1)}
        except Exception as err:  # noqa: BLE001 - recorded; the other parts still run
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:800],
                            "seconds": round(time.time() - t, 1)}

    def engine():
        run_attack(attack("engine", actors=1, gpus_per_actor=1.0 if gpu else 0.0), RayActors(), show=False)
        run_attack(attack("one_process"), OneProcess(a.device), show=False)
        same = records("engine") == records("one_process")
        return {"ok": same, "records_equal_one_process": same, "images": len(records("engine"))}

    def training():
        cfg = build(TrainEBMConfig, {
            "data": {"path": shared("datasets/cifar10/test-exact-1000.parquet"), "split": "test"},
            "langevin": {"steps": 10}, "iterations": 6, "batch_size": 16, "bank_size": 64, "checkpoint_every": 3,
            "log_every": 3, "precision": "float32_strict", "output": f"{a.out}/train", "name": "smoke",
            "mlflow": {"enabled": False}, "ray": {"workers": 1, "use_gpu": gpu, "bank_shards": 1}})
        out = train_ebm_on_ray(cfg, show=False)
        finite = all(out[k] == out[k] for k in ("loss", "energy_diff"))
        return {"ok": out["iteration"] == 6 and finite, "iteration": out["iteration"], "loss": out["loss"],
                "iterations_per_second": out["iterations_per_second"], "chain_bank_update_seconds":
                    [out["chain_seconds"], out["bank_seconds"], out["update_seconds"]]}

    def shared_gpu():
        run_attack(attack("two_actors", actors=2, gpus_per_actor=0.5 if gpu else 0.0), RayActors(), show=False)
        same = records("two_actors") == records("engine")
        return {"ok": same, "records_equal_one_actor": same}

    part("a_engine_one_actor", engine)
    part("b_train_one_worker", training)
    part("c_two_actors_half_gpu_each", shared_gpu)
    if ray.is_initialized():
        ray.shutdown()
    report["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(a.out, "ray_gpu_smoke.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"ray {report['ray']}, torch {report['torch']}, {report.get('gpu', 'CPU')}, {report['seconds']} s")
    for k in ("a_engine_one_actor", "b_train_one_worker", "c_two_actors_half_gpu_each"):
        r = report[k]
        print(f"{k:28s} {'ok' if r.get('ok') else 'FAILED':7s} {r['seconds']:6.1f} s  "
              + ", ".join(f"{n}={v}" for n, v in r.items() if n not in ("ok", "seconds")))
    return 0 if all(report[k].get("ok") for k in report if k[:2] in ("a_", "b_", "c_")) else 1


if __name__ == "__main__":
    sys.exit(main())
