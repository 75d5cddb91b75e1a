"""jobs/attack_local.py (`debm attack-local`): an attack config in one process without Ray, MLflow or s3fs
(a machine with one GPU)."""
import os
import subprocess
import sys

import numpy as np

from distributed_ebm.cli import main
from distributed_ebm.config import AttackConfig, build
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.recipes.attack import run_attack
from distributed_ebm.results import records as results
from distributed_ebm.store.checkpoints import save_ebm

from .conftest import REPO, RESNET20, TEST_EXACT, tiny_ebm

ARGS = ["attack.mode=bpda_eot", "attack.eps=2/255", "attack.step_size=1/255", "attack.steps=2", "attack.eot_attack=2",
        "attack.eot_defense=2", "purify.steps=2", "purify.noise=0.05", "batch_size=2", "seed=1", "mlflow.enabled=false",
        f"data.path={TEST_EXACT}", "data.random=3", f"classifier.weights={RESNET20}"]


def test_runs_without_ray_mlflow_or_s3fs_equal_to_the_engine_and_resumes(tmp_path):
    ebm = str(tmp_path / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), ebm)
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nfor m in ('ray', 'mlflow', 's3fs', 'boto3', 'optuna', 'moto'):\n    sys.modules[m] = None\n")
    out = str(tmp_path / "local")
    cmd = [sys.executable, str(REPO / "jobs" / "attack_local.py"), "--config",
           str(REPO / "jobs" / "configs" / "results" / "defended_bpda_eot.yaml"), "--device", "cpu",
           f"ebm={ebm}", f"output={out}", *ARGS]
    env = {**os.environ, "PYTHONPATH": str(block), "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "attack-local: bpda_eot on cpu" in run.stdout and f"results: {out}/records/" in run.stdout
    ref = str(tmp_path / "ref")
    tree = {"data": {"path": TEST_EXACT, "random": 3, "subset_seed": 0}, "classifier": {"weights": RESNET20},
            "ebm": ebm,
            "purify": {"steps": 2, "noise": 0.05, "step_size": 1.0}, "batch_size": 2, "seed": 1, "output": ref,
            "attack": {"mode": "bpda_eot", "eps": "2/255", "step_size": "1/255", "steps": 2, "eot_attack": 2,
                       "eot_defense": 2, "average": "logits", "reevaluations": 2, "random_start": True},
            "mlflow": {"enabled": False}}
    run_attack(build(AttackConfig, tree), OneProcess("cpu"), show=False)
    mine, theirs = results.read_records(out).to_pylist(), results.read_records(ref).to_pylist()
    assert [r["index"] for r in mine] == [r["index"] for r in theirs] and len(mine) == 3
    for a, b in zip(mine, theirs):
        assert {k: v for k, v in a.items() if k != "adv_image"} == {k: v for k, v in b.items() if k != "adv_image"}
        assert np.array_equal(a["adv_image"], b["adv_image"])
    first = results.load_summary(out)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # every image has a record
    assert again.returncode == 0, again.stderr[-3000:]
    summary = results.load_summary(out)
    assert summary["image_steps_this_run"] == 0 and summary["seconds"] == first["seconds"] > 0


def test_bad_device_is_one_line(tmp_path, capsys):
    cfg = str(REPO / "jobs" / "configs" / "results" / "defended_bpda_eot.yaml")
    assert main(["attack-local", "--config", cfg, "--device", "tpu:x", f"output={tmp_path}", *ARGS]) == 2
    assert "--device 'tpu:x' is not a torch device" in capsys.readouterr().err


def test_a_one_process_run_builds_its_attack_once_and_draws_its_gallery_with_it(tmp_path, monkeypatch):
    """The gallery reuses the run's attack (no second load of the weights, no second chunk-size probe), and
    draws the same pictures as an attack built anew."""
    import distributed_ebm.recipes.attack as recipe
    ebm = str(tmp_path / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), ebm)
    tree = {"data": {"path": TEST_EXACT, "random": 2, "subset_seed": 0}, "classifier": {"weights": RESNET20},
            "ebm": ebm,
            "purify": {"steps": 2, "noise": 0.05, "step_size": 1.0}, "batch_size": 2, "seed": 1,
            "output": str(tmp_path / "out"), "report": {"gallery": 2},
            "attack": {"mode": "bpda_eot", "eps": "2/255", "step_size": "1/255", "steps": 1, "eot_attack": 2,
                       "eot_defense": 2, "reevaluations": 0}, "mlflow": {"enabled": False}}
    cfg = build(AttackConfig, tree)
    built, real = [], recipe.build_attack
    monkeypatch.setattr(recipe, "build_attack", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    run_attack(cfg, OneProcess("cpu"), show=False)
    assert len(built) == 1 and os.path.exists(tmp_path / "out" / "gallery.png")
    monkeypatch.undo()
    reused, anew = recipe.gallery_rows(cfg, None, "cpu", built[0]), recipe.gallery_rows(cfg)
    assert len(reused) == len(anew) == 2
    for a, b in zip(reused, anew):
        assert a.purified_preds == b.purified_preds and np.array_equal(a.purified_clean, b.purified_clean)
        assert np.array_equal(a.purified_adversarial, b.purified_adversarial, equal_nan=True)
