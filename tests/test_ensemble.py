"""attack.ensemble: worst case over attacks, AutoAttack's way, in one resumable job."""
import os

import numpy as np
import pytest

from distributed_ebm import results, storage
from distributed_ebm.cli import main
from distributed_ebm.config import AttackConfig, ConfigError, build
from distributed_ebm.evaluation import run_attack
from distributed_ebm.nets import save_ebm

from .conftest import RESNET20, TEST_EXACT, tiny_ebm

MEMBERS = [{"mode": "bpda_eot", "eps": "0.5/255"}, {"optimizer": "apgd", "loss": "dlr"},
           {"mode": "exact_eot", "segment": 1}]


def _tree(ebm, out, **attack):
    return {"data": {"path": TEST_EXACT, "indices": list(range(6))}, "classifier": {"weights": RESNET20}, "ebm": ebm,
            "purify": {"steps": 2, "noise": 0.05},
            "attack": {"eps": "2/255", "step_size": "1/255", "steps": 2, "eot_attack": 2, "eot_defense": 2, **attack},
            "batch_size": 4, "precision": "float64", "seed": 1, "output": out, "mlflow": {"enabled": False}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The ensemble and each member alone, single-process."""
    d = tmp_path_factory.mktemp("ensemble")
    ebm = str(d / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), ebm)
    summary = run_attack(build(AttackConfig, _tree(ebm, str(d / "ens"), ensemble=MEMBERS)), show=False)
    alone = []
    for k, m in enumerate(MEMBERS):
        run_attack(build(AttackConfig, _tree(ebm, str(d / f"m{k}"), **m)), show=False)
        alone.append(results.read_records(str(d / f"m{k}")).to_pylist())
    return ebm, summary, results.read_records(str(d / "ens")).to_pylist(), alone


def test_robust_only_if_every_attack_alone_fails_and_records_name_the_breaker(runs):
    _, summary, ens, alone = runs
    assert [r["index"] for r in ens] == list(range(6))
    broke = set()
    for r in ens:
        i = r["index"]
        by = next((k for k, recs in enumerate(alone) if recs[i]["broken_at"] != -1), -1)
        assert r["broken_by"] == by
        assert (r["broken_at"] == -1) == (by == -1) == all(recs[i]["broken_at"] == -1 for recs in alone)
        assert r["natural_correct"] == alone[0][i]["natural_correct"]
        m = alone[by if by >= 0 else -1][i]  # what the breaker (else the last attack) recorded
        assert (r["broken_at"], r["final_pred"]) == (m["broken_at"], m["final_pred"])
        assert np.array_equal(r["adv_image"], m["adv_image"])
        ran = range(len(MEMBERS)) if by == -1 else range(by + 1)
        assert r["image_steps"] == sum(alone[k][i]["image_steps"] for k in ran)
        broke.add(by)
    assert {0, -1} <= broke and len(broke) >= 3, broke  # the case exercises a break by a later attack too
    per = summary["ensemble"]
    assert [p["broken"] for p in per] == [sum(r["broken_by"] == k for r in ens) for k in range(3)]
    assert per[-1]["robust_accuracy"] == summary["robust_accuracy"] == np.mean([r["broken_by"] == -1 for r in ens])


def test_bad_ensembles_fail_in_one_line():
    base = {"ebm": "e.pt"}
    for ensemble, message in [
            ([{"mode": "bpda_eot"}, {"steps": -1}], "attack.ensemble[1]: steps = -1: Input should be greater than or equal to 0"),
            ([{"nope": 1}], "attack.ensemble[0]: nope: unknown key"),
            ([{"mode": "defense"}], "attack.ensemble[0]: mode defense does not attack"),
            ([{"mode": "pgd"}, {"mode": "bpda_eot"}], "attack.ensemble mixes the undefended classifier"),
            ([{"reevaluations": 2}], "attack.ensemble[0]: reevaluations cannot be set per attack"),
            ([], "attack.ensemble is empty")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build(AttackConfig, {**base, "attack": {"ensemble": ensemble}})
    with pytest.raises(ConfigError, match="attack.reevaluations is not supported with attack.ensemble"):
        build(AttackConfig, {**base, "attack": {"ensemble": [{}], "reevaluations": 1}})


def test_debm_attack_runs_an_ensemble_on_ray_resumes_and_reports_each_attack(ray_local, runs, tmp_path, capsys):
    import yaml
    ebm, summary, ens, _ = runs
    out = str(tmp_path / "ray")
    cfg = tmp_path / "ens.yaml"
    cfg.write_text(yaml.safe_dump({**_tree(ebm, out, ensemble=MEMBERS), "ray": {"actors": 2}}))
    assert main(["attack", "--config", str(cfg)]) == 0
    assert "[attack:ensemble] 6/6" in capsys.readouterr().err  # progress names the ensemble, not its first mode
    parts = results.list_parts(out)
    assert len(parts) == 2
    os.remove(parts[0])  # a lost batch: the rerun attacks only its images
    assert main(["attack", "--config", str(cfg)]) == 0
    assert results.read_records(out).to_pylist() == ens
    capsys.readouterr()
    assert main(["report", out]) == 0
    table = capsys.readouterr().out
    assert "ensemble of 3" in table and "1. BPDA+EOT linf eps=0.5/255" in table and "2. BPDA+EOT APGD-DLR" in table
    assert "3. exact-gradient EOT" in table and "images broken" in table and "robust % after it" in table
    assert storage.exists(out + "/summary.json")
