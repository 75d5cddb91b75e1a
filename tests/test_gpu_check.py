"""benchmarks/gpu_check.py --device cpu --quick runs in CI, so the prepared device check cannot rot."""
import json
import os
import subprocess
import sys

from .conftest import REPO


def test_gpu_check_quick_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--out", str(out), "--budget", "240"], env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    c = report["correctness"]
    assert set(c) == {"noise", "langevin_chain", "exact_gradient", "exact_gradient_judged_chain", "training_iteration",
                      "bpda_eot_records"}
    assert all(v["ok"] for v in c.values()), c
    th = report["throughput"]
    assert th["langevin"][0]["plain_fp32"] > 0 and th["training"]["iterations_per_s"] > 0
    assert th["bpda_eot_engine"]["image_steps"] > 0
    assert {"eval_500_images_hours", "train_250k_hours", "share_of_bf16_peak"} <= set(report["projection"])
    assert run.stdout.rstrip().splitlines()[-1].startswith("projection train_250k_hours")  # the table comes last


def test_gpu_check_rejects_a_missing_file(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--ebm", str(tmp_path / "none.pt")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and "--ebm: no such file" in run.stderr
