"""The commands end to end, with results on a real S3-compatible endpoint (moto server, 127.0.0.1)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from distributed_ebm.cli import main
from distributed_ebm.results.records import read_records
from distributed_ebm.store import storage


def test_attack_writes_records_summary_plots_and_mlflow_artifacts_to_s3(ray_local, s3_bucket, tmp_path, capsys):
    import mlflow
    out = f"{s3_bucket}/attack-pgd"
    assert main(["attack", "--config", "jobs/configs/attack_pgd_undefended.yaml", "data.count=6", "batch_size=3",
                 "attack.steps=5", f"output={out}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
                 f"mlflow.artifact_location={s3_bucket}/mlflow", "mlflow.experiment=s3-test"]) == 0
    printed = capsys.readouterr().out
    assert "resnet20 undefended" in printed and "PGD linf eps=8/255, 5 steps" in printed
    assert main(["report", out]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("resnet20 undefended  6")
    assert main(["report", f"{s3_bucket}/nothing-here"]) == 2
    table = read_records(out)
    assert table.num_rows == 6 and table.column("index").to_pylist() == list(range(6))
    assert set(table.column_names) >= {"index", "label", "natural_protocol_pred", "natural_protocol_correct",
                                       "natural_defense_pred", "natural_defense_correct", "broken_at", "final_pred",
                                       "adv_image"}
    summary = json.loads(storage.read_bytes(out + "/summary.json"))
    assert summary["images"] == 6 and len(summary["accuracy_curve"]) == 7
    assert storage.read_bytes(out + "/accuracy.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.exists(out + "/gallery.png")
    # MLflow: one run with the summary's figures and the config, its artifacts in the bucket
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    (run,) = mlflow.search_runs(experiment_names=["s3-test"], output_format="list")
    assert run.data.metrics["robust_accuracy"] == summary["robust_accuracy"]
    assert run.data.params["attack.mode"] == "pgd" and run.info.artifact_uri.startswith(f"{s3_bucket}/mlflow")
    fs, _ = storage.filesystem(out)
    fs.invalidate_cache()
    names = {os.path.basename(p) for p in fs.find(f"{s3_bucket.removeprefix('s3://')}/mlflow")}
    assert {"summary.json", "accuracy.png", "gallery.png"} <= names  # every run draws its gallery (6 images here)


def test_a_config_file_on_s3_is_read_as_a_local_one(s3_bucket, capsys):
    """A search on S3 writes its best settings there and says `--config THIS`: --config reads a URL as it reads a
    local file."""
    url = f"{s3_bucket}/configs/best_attack.yaml"
    storage.write_bytes(url, f"ebm: {s3_bucket}/ebm.pt\nattack:\n  steps: 7\npurify:\n  noise: 0.02\n".encode())
    assert main(["attack", "--config", url, "--print-config", "batch_size=5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["attack"]["steps"] == 7 and cfg["purify"]["noise"] == 0.02 and cfg["batch_size"] == 5
    assert main(["attack", "--config", f"{s3_bucket}/configs/nope.yaml"]) == 2
    assert capsys.readouterr().err.strip() == f"debm attack: config file {s3_bucket}/configs/nope.yaml does not exist"


def test_job_file_reports_bad_input_in_one_line():
    done = subprocess.run([sys.executable, "jobs/attack.py", "ebm=missing.pt", "attack.mode=defense", "data.count=0"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == ("debm attack: config error: data.count = 0: "
                                   "Input should be greater than or equal to 1")
    done = subprocess.run([sys.executable, "jobs/attack.py", "ebm=missing.pt", "attack.mode=defense", "data.count=2"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"debm attack: {os.path.abspath('missing.pt')} does not exist"


def test_overrides_stand_anywhere_on_the_line(capsys):
    """Before, argparse's positional list took one unbroken run of overrides: `trials=3 --config FILE rungs=[30,60]`
    was refused as unrecognized arguments."""
    assert main(["tune", "--config", "jobs/configs/tune_purification.yaml", "--print-config", "rungs=[25,50]"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["rungs"] == [25, 50]
    assert main(["tune", "trials=3", "--config", "jobs/configs/tune_purification.yaml", "rungs=[30,60]",
                 "--print-config", "seed=4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["trials"], cfg["rungs"], cfg["seed"]) == (3, [30, 60], 4)
    with pytest.raises(SystemExit) as exit:
        main(["tune", "rungs=[25,50]", "--bogus", "3", "--print-config"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == ("debm tune: '--bogus' is not an option of debm tune (see debm tune --help); "
                                       "overrides are key=value\n")
    assert main(["attack", "--print-config", "attack.steps"]) == 2  # not key=value: the loader's one line
    assert "override 'attack.steps' is not of the form key=value" in capsys.readouterr().err


def test_run_job_turns_user_facing_failures_into_one_line(capsys):
    from distributed_ebm.errors import ConfigError, JobFailed, run_job
    from distributed_ebm.method.training import TrainingDiverged

    def fail(exc):
        def job():
            raise exc
        return job

    assert run_job("job", lambda: None) == 0
    assert run_job("job", fail(ConfigError("batch_size: must be > 0"))) == 2
    assert run_job("job", fail(FileNotFoundError("no such file: x.pt"))) == 2
    assert run_job("job", fail(JobFailed("capacity lost"))) == 1
    assert run_job("job", fail(TrainingDiverged("EBM loss is nan"))) == 1  # a diverged run, not a traceback
    assert capsys.readouterr().err.splitlines() == ["job: batch_size: must be > 0", "job: no such file: x.pt",
                                                   "job: capacity lost", "job: EBM loss is nan"]
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_job("job", fail(KeyError("bug")))


def test_report_pairs_runs_on_their_shared_images(tmp_path, capsys):
    """`debm report A B`: both tables, then per pair of runs that share images, what each breaks that the other
    leaves robust and the two-sided sign test on those images."""
    from distributed_ebm.config import AttackConfig, load_config
    from distributed_ebm.local.attack import OneProcess
    from distributed_ebm.recipes.attack import run_attack
    from distributed_ebm.results.records import paired_comparison, sign_test_p

    assert sign_test_p(0, 0) == 1.0 and sign_test_p(1, 0) == 1.0 and sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(3, 7) == sign_test_p(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    outs = {}
    for name, eps, ids in (("weak", "0.25/255", [0, 1, 2, 3, 4, 5, 6, 7]),
                           ("strong", "2/255", [2, 3, 4, 5, 6, 7, 8, 9])):
        outs[name] = str(tmp_path / name)
        cfg = load_config(AttackConfig, "jobs/configs/attack_pgd_undefended.yaml",
                          ["data.count=null", f"data.indices={ids}", f"attack.eps={eps}", "attack.steps=3",
                           f"output={outs[name]}",
                           "mlflow.enabled=false"])
        run_attack(cfg, OneProcess(), show=False)
    d = paired_comparison(outs["weak"], outs["strong"])
    weak, strong = (dict(zip(t.column("index").to_pylist(), t.column("broken_at").to_pylist()))
                    for t in (read_records(outs["weak"]), read_records(outs["strong"])))
    shared = range(2, 8)
    assert d["images"] == 6
    assert d["broken_by_b_only"] == sum(weak[i] == -1 and strong[i] != -1 for i in shared) >= 1
    assert d["broken_by_a_only"] + d["broken_by_b_only"] + d["broken_by_both"] + d["robust_in_both"] == 6
    assert d["sign_test_p"] == sign_test_p(d["broken_by_a_only"], d["broken_by_b_only"])
    assert main(["report", outs["weak"], outs["strong"]]) == 0
    printed = capsys.readouterr().out
    assert "paired comparison (the images both runs attacked)" in printed
    # one defense (the undefended ResNet-20) under two runs: per shared image, robust only if robust under both
    worst = printed.split("worst case over the runs of each defense (per shared image):\n")[1].splitlines()[2]
    standing = sum(weak[i] == -1 and strong[i] == -1 for i in shared)
    assert d["robust_in_both"] == standing
    assert worst.split()[:5] == ["resnet20", "undefended", "2", "6", f"{100 * standing / 6:.1f}"]
    row = printed.splitlines()[-1].split()
    assert row[:6] == [outs["weak"], outs["strong"], "6", str(d["broken_by_a_only"]), str(d["broken_by_b_only"]),
                       str(d["broken_by_both"])]
    assert paired_comparison(outs["weak"], outs["weak"])["sign_test_p"] == 1.0


@pytest.mark.parametrize("command, args", [
    ("train-ebm", ["--config", "jobs/configs/train_ebm_cpu.yaml", "data.count=64", "batch_size=8", "bank_size=16",
                   "ray.use_gpu=true"]),
    ("attack", ["attack.mode=pgd", "data.count=2", "ray.gpus_per_actor=1"]),
])
def test_a_job_that_asks_for_gpus_no_node_can_give_fails_in_seconds(ray_local, tmp_path, capsys, monkeypatch,
                                                                    command, args):
    """On a cluster without GPUs and without an autoscaler the job fails at once, naming what it asked for: it
    neither waits out ray.startup_timeout_s nor leaves an actor pool waiting for ever."""
    import time

    monkeypatch.setenv("DEBM_AUTOSCALER_CONFIG", str(tmp_path / "no-autoscaler.yaml"))
    started = time.monotonic()
    assert main([command, *args, f"output={tmp_path}/out", "mlflow.enabled=false"]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()[-1]
    key = "ray.use_gpu" if command == "train-ebm" else "ray.gpus_per_actor"
    assert err == (f"debm {command}: {key} = 1: no node of this cluster can provide 1 GPU (the most any alive node "
                   "holds: 0), and it has no autoscaler that could add one")
