import subprocess
import sys

import pytest

from distributed_ebm.cli import main
from distributed_ebm.config import AttackConfig, TrainEBMConfig, load_config
from distributed_ebm.errors import ConfigError


def test_defaults_are_the_papers_numbers():
    a = load_config(AttackConfig, None, ["ebm=x.pt"])
    assert (a.purify.steps, a.purify.step_size, a.purify.noise) == (1500, 1.0, 0.01)
    assert (a.attack.eps, a.attack.step_size, a.attack.steps) == (8 / 255, 2 / 255, 50)
    assert (a.attack.eot_attack, a.attack.eot_defense) == (15, 150)
    t = load_config(TrainEBMConfig)
    assert ((t.iterations, t.batch_size, t.langevin.steps, t.langevin.noise, t.sgd_start)
            == (250_000, 100, 100, 0.01, 125_000))
    assert t.data.path.endswith("train.parquet")


def test_overrides_fractions_and_env(tmp_path, monkeypatch):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("attack: {eps: 4/255}\ndata: {count: 7}\nebm: ${oc.env:MY_EBM}\n"
                   "output: ${oc.env:NOT_SET_HERE,s3://b/out}/${attack.mode}\n")
    monkeypatch.setenv("MY_EBM", "s3://b/ebm.pt")
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    a = load_config(AttackConfig, cfg, ["attack.steps=3", "purify.noise=0.02", "attack.mode=transfer"])
    assert a.attack.eps == pytest.approx(4 / 255) and a.attack.steps == 3 and a.purify.noise == 0.02
    assert a.ebm == "s3://b/ebm.pt" and a.data.count == 7 and a.output == "s3://b/out/transfer"
    # a partial section keeps the job's own defaults for the rest
    t = load_config(TrainEBMConfig, None, ["data.count=5"])
    assert t.data.path.endswith("train.parquet") and t.data.split == "train"


@pytest.mark.parametrize("override, message", [
    ("attack.eps=2", "attack.eps = 2: Input should be less than or equal to 1"),
    ("data.bogus=1", "data.bogus: unknown key"),
    ("attack.mode=foo", "attack.mode = 'foo': Input should be 'bpda_eot', 'exact_eot', 'pgd', 'transfer' or 'defense'"),
    ("purify.steps=-1", "purify.steps = -1: Input should be greater than or equal to 0"),
    ("batch_size=many", "batch_size = 'many': Input should be a valid integer"),
    ("data.indices=[]", "data: indices is empty"),
])
def test_bad_values_name_the_key_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(AttackConfig, None, ["ebm=x.pt", override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_ebm_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="set ebm to a checkpoint URL"):
        load_config(AttackConfig, None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(AttackConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(AttackConfig, None, ["steps"])


def test_cli_exits_2_with_one_line(capsys):
    assert main(["attack", "ebm=x.pt", "attack.eot_attack=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "debm attack: config error: attack.eot_attack = 0: Input should be greater than or equal to 1"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "distributed_ebm.cli", "train-ebm", "--print-config", "iterations=5"],
                         capture_output=True, text=True, check=True).stdout
    assert "iterations: 5" in out


def test_every_job_config_validates():
    from pathlib import Path

    from distributed_ebm.cli import COMMANDS
    kinds = {"train_ebm": "train-ebm", "train_classifier": "train-classifier", "attack": "attack",
             "quickstart": "quickstart", "tune_purification": "tune", "tune_training": "tune-training"}
    files = sorted(Path("jobs/configs").glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        command = next(v for k, v in kinds.items() if f.stem.startswith(k))
        load_config(COMMANDS[command][0], f)
    # the quickstart file is the embedded default, spelled out
    assert (load_config(COMMANDS["quickstart"][0], "jobs/configs/quickstart.yaml")
            == load_config(COMMANDS["quickstart"][0]))


def test_batch_must_split_over_training_workers():
    """The check lives in the schema, so `--print-config` refuses what the job could not run."""
    with pytest.raises(ConfigError) as err:
        load_config(TrainEBMConfig, None, ["batch_size=100", "ray.workers=8"])
    assert str(err.value) == ("config error: batch_size = 100 does not split evenly over ray.workers = 8 "
                              "(each worker takes batch_size / ray.workers chains)")
    assert load_config(TrainEBMConfig, None, ["batch_size=100", "ray.workers=4"]).ray.workers == 4
    out = subprocess.run([sys.executable, "-m", "distributed_ebm.cli", "train-ebm", "--print-config", "ray.workers=8"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "ray.workers = 8" in out.stderr
