"""The commands end to end, with results on a real S3-compatible endpoint (moto server, 127.0.0.1)."""
import json
import os
import subprocess
import sys

import pytest

from distributed_ebm import storage
from distributed_ebm.cli import main
from distributed_ebm.nets import load_ebm
from distributed_ebm.results import read_records


def test_attack_writes_records_summary_and_plot_to_s3(ray_local, s3_bucket, tmp_path, capsys):
    out = f"{s3_bucket}/attack-pgd"
    assert main(["attack", "--config", "jobs/configs/attack_pgd_undefended.yaml", "data.count=6", "batch_size=3",
                 "attack.steps=5", f"output={out}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
                 f"mlflow.artifact_location={tmp_path}/art"]) == 0
    printed = capsys.readouterr().out
    assert "resnet20 undefended" in printed and "PGD linf eps=8/255, 5 steps" in printed
    assert main(["report", out]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("resnet20 undefended  6")
    assert main(["report", f"{s3_bucket}/nothing-here"]) == 2
    table = read_records(out)
    assert table.num_rows == 6 and table.column("index").to_pylist() == list(range(6))
    assert set(table.column_names) >= {"index", "label", "natural_pred", "natural_correct", "broken_at", "final_pred", "adv_image"}
    summary = json.loads(storage.read_bytes(out + "/summary.json"))
    assert summary["images"] == 6 and len(summary["accuracy_curve"]) == 7
    assert storage.read_bytes(out + "/accuracy.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_ebm_command_runs_on_ray_and_resumes(ray_local, tmp_path, capsys):
    args = ["--config", "jobs/configs/train_ebm_cpu.yaml", "data.count=64", "ebm.width=4", "langevin.steps=2",
            "batch_size=8", "bank_size=16", "checkpoint_every=2", "log_every=2", f"output={tmp_path}", "name=cli",
            "mlflow.enabled=false"]
    assert main(["train-ebm", *args, "iterations=2"]) == 0
    capsys.readouterr()
    assert main(["train-ebm", *args, "iterations=4"]) == 0
    out, err = capsys.readouterr()
    assert f"EBM trained to iteration 4: {tmp_path}/cli/ebm.pt" in out
    # the driver's own progress line (rank 0 posts it; the workers print nothing here), resumed at 2
    progress = [line for line in err.splitlines() if line.startswith("[train-ebm:cli]")]
    assert progress and progress[-1].startswith("[train-ebm:cli] 4/4 (100.0%)") and "energy_diff=" in progress[-1]
    assert "TrainingReport" not in out + err
    assert storage.load_torch(f"{tmp_path}/cli/ebm.pt")["iteration"] == 4 and load_ebm(f"{tmp_path}/cli/ebm.pt").width == 4


def test_job_file_reports_bad_input_in_one_line():
    done = subprocess.run([sys.executable, "jobs/attack.py", "ebm=missing.pt", "attack.mode=defense", "data.count=0"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "debm attack: config error: data.count = 0: Input should be greater than or equal to 1"
    done = subprocess.run([sys.executable, "jobs/attack.py", "ebm=missing.pt", "attack.mode=defense", "data.count=2"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == f"debm attack: {os.path.abspath('missing.pt')} does not exist"


def test_exit_status_turns_user_facing_failures_into_one_line(capsys):
    from distributed_ebm.config import ConfigError, JobFailed, exit_status
    from distributed_ebm.training import TrainingDiverged

    def fail(exc):
        def job():
            raise exc
        return job

    assert exit_status("job", lambda: None) == 0
    assert exit_status("job", fail(ConfigError("batch_size: must be > 0"))) == 2
    assert exit_status("job", fail(FileNotFoundError("no such file: x.pt"))) == 2
    assert exit_status("job", fail(JobFailed("capacity lost"))) == 1
    assert exit_status("job", fail(TrainingDiverged("EBM loss is nan"))) == 1  # a diverged run, not a traceback
    assert capsys.readouterr().err.splitlines() == ["job: batch_size: must be > 0", "job: no such file: x.pt",
                                                   "job: capacity lost", "job: EBM loss is nan"]
    with pytest.raises(KeyError):  # a bug keeps its traceback
        exit_status("job", fail(KeyError("bug")))
