"""MEFA's protocol (jobs/configs/attack_mefa.yaml): its numbers, and `debm attack` running it on the Ray engine."""
import json

import pytest
import torch

from distributed_ebm.cli import main
from distributed_ebm.config import AttackConfig, load_config
from distributed_ebm.method.nets import EBM
from distributed_ebm.results.records import read_records
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import save_ebm

MEFA = "jobs/configs/attack_mefa.yaml"


def test_the_config_holds_mefas_numbers():
    cfg = load_config(AttackConfig, MEFA)
    a = cfg.attack
    assert (a.mode, a.optimizer, a.loss, a.norm, a.steps, a.eot_attack, a.random_start, a.segment) == \
        ("exact_eot", "pgd", "ce", "linf", 100, 20, False, None)
    assert a.eps == pytest.approx(8 / 255) and a.step_size == pytest.approx(2 / 255)
    assert cfg.purify.steps == 1500 and cfg.data.count == 510 and cfg.data.path.endswith("test-exact-1000.parquet")
    assert cfg.ebm_net.activation == "soft_lrelu"


def test_mismatched_ebm_fails_in_one_line(capsys):
    assert main(["attack", "--config", MEFA, "ebm=models/ebm-cifar10-cpu/ebm.pt", "data.count=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("has activation lrelu (slope=0.05), the config asks for soft_lrelu "
                                           "(alpha=0.49, eps=0.01)")


def test_debm_attack_runs_mefas_protocol_on_the_ray_engine(ray_local, tmp_path, capsys):
    torch.manual_seed(0)
    ebm = EBM(width=4, activation="soft_lrelu")
    with torch.no_grad():
        ebm.net[-1].weight.mul_(20)
    save_ebm(ebm, str(tmp_path / "ebm.pt"))
    out = str(tmp_path / "mefa")
    steps, eot, reeval = 3, 2, 1
    assert main(["attack", "--config", MEFA, f"ebm={tmp_path}/ebm.pt", "data.count=2", f"purify.steps={steps}",
                 "attack.steps=2", f"attack.eot_attack={eot}", "attack.eot_defense=2", f"attack.reevaluations={reeval}",
                 "attack.eps=1/255", "attack.step_size=0.5/255", "batch_size=1", f"output={out}",
                 "mlflow.enabled=false", "ray.gpus_per_actor=0"]) == 0
    assert "exact-gradient EOT linf eps=1/255, 2 steps, 2/2 chains" in capsys.readouterr().out
    summary = json.loads(storage.read_bytes(out + "/summary.json"))
    assert summary["images"] == 2 and summary["config"]["attack"]["mode"] == "exact_eot"
    assert summary["config"]["ebm_net"]["activation"] == "soft_lrelu" and summary["reevaluations"] == reeval
    records = read_records(out).to_pylist()
    assert sorted(r["index"] for r in records) == [0, 1]
    assert any(r["broken_at"] == -1 for r in records)
    for r in records:  # checks at points 0 and 3; exact gradients (3 chain runs, their output checks) at 1 and 2;
        if r["broken_at"] == -1:  # the defense's own 2-chain vote on the clean image; the re-evaluation
            assert r["image_steps"] == eot * steps * (2 + 2 * 3) + 2 * steps + reeval * 2 * steps
