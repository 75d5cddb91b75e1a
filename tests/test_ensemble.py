"""attack.ensemble: worst case over attacks, AutoAttack's way, in one resumable job."""
import os

import numpy as np
import pytest

from distributed_ebm.cli import main
from distributed_ebm.config import AttackConfig, build
from distributed_ebm.errors import ConfigError
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.recipes.attack import run_attack
from distributed_ebm.results import records as results
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import save_ebm

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
    summary = run_attack(build(AttackConfig, _tree(ebm, str(d / "ens"), ensemble=MEMBERS, ensemble_keys="paired")),
                         OneProcess(), show=False)
    alone = []
    for k, m in enumerate(MEMBERS):
        run_attack(build(AttackConfig, _tree(ebm, str(d / f"m{k}"), **m)), OneProcess(), show=False)
        alone.append(results.read_records(str(d / f"m{k}")).to_pylist())
    return ebm, summary, results.read_records(str(d / "ens")).to_pylist(), alone


def test_robust_only_if_every_attack_alone_fails_and_records_name_the_breaker(runs):
    """With paired keys every member draws the run seed's keys: each is then exactly the member alone."""
    _, summary, ens, alone = runs
    assert [r["index"] for r in ens] == list(range(6))
    broke = set()
    for r in ens:
        i = r["index"]
        by = next((k for k, recs in enumerate(alone) if recs[i]["broken_at"] != -1), -1)
        assert r["broken_by"] == by
        assert (r["broken_at"] == -1) == (by == -1) == all(recs[i]["broken_at"] == -1 for recs in alone)
        assert r["natural_protocol_correct"] == alone[0][i]["natural_protocol_correct"]
        assert r["natural_defense_pred"] == alone[0][i]["natural_defense_pred"]
        m = alone[by if by >= 0 else -1][i]  # what the breaker (else the last attack) recorded
        assert (r["broken_at"], r["final_pred"]) == (m["broken_at"], m["final_pred"])
        assert np.array_equal(r["adv_image"], m["adv_image"])
        ran = range(len(MEMBERS)) if by == -1 else range(by + 1)
        # every member's chains, less the defense's vote on the clean image (2 chains x 2 steps) that only the first
        # member casts; a later member alone casts it too where its check is right
        spent = sum(alone[k][i]["image_steps"] for k in ran)
        assert spent - 4 * (len(ran) - 1) <= r["image_steps"] <= spent
        broke.add(by)
    assert {0, -1} <= broke and len(broke) >= 3, broke  # the case exercises a break by a later attack too
    per = summary["ensemble"]
    assert [p["broken"] for p in per] == [sum(r["broken_by"] == k for r in ens) for k in range(3)]
    assert per[-1]["robust_accuracy"] == summary["robust_accuracy"] == np.mean([r["broken_by"] == -1 for r in ens])


def test_bad_ensembles_fail_in_one_line():
    base = {"ebm": "e.pt"}
    for ensemble, message in [
            ([{"mode": "bpda_eot"}, {"steps": -1}],
             "attack.ensemble[1]: steps = -1: Input should be greater than or equal to 0"),
            ([{"nope": 1}], "attack.ensemble[0]: nope: unknown key"),
            ([{"mode": "defense"}], "attack.ensemble[0]: mode defense does not attack"),
            ([{"mode": "pgd"}, {"mode": "bpda_eot"}], "attack.ensemble mixes the undefended classifier"),
            ([{"reevaluations": 2}], "attack.ensemble[0]: reevaluations cannot be set per attack"),
            ([{"restarts": 2}], "attack.ensemble[0]: restarts cannot be set per attack"),
            ([], "attack.ensemble is empty")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build(AttackConfig, {**base, "attack": {"ensemble": ensemble}})
    with pytest.raises(ConfigError, match="attack.reevaluations is not supported with attack.ensemble"):
        build(AttackConfig, {**base, "attack": {"ensemble": [{}], "reevaluations": 1}})
    with pytest.raises(ConfigError, match="attack.reevaluations is not supported with attack.restarts > 1"):
        build(AttackConfig, {**base, "attack": {"restarts": 2, "reevaluations": 1}})
    with pytest.raises(ConfigError, match="attack.restarts = 2: mode defense does not attack"):
        build(AttackConfig, {**base, "attack": {"restarts": 2, "mode": "defense"}})


def test_debm_attack_runs_an_ensemble_on_ray_resumes_and_reports_each_attack(ray_local, runs, tmp_path, capsys):
    import yaml
    ebm, summary, ens, _ = runs
    out = str(tmp_path / "ray")
    cfg = tmp_path / "ens.yaml"
    cfg.write_text(yaml.safe_dump({**_tree(ebm, out, ensemble=MEMBERS, ensemble_keys="paired"), "ray": {"actors": 2}}))
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


def _records(cfg):
    from distributed_ebm.recipes.attack import build_attack
    from distributed_ebm.store.data import read_images
    data = read_images(cfg.data)
    return build_attack(cfg, "cpu")(data.floats().double(), data.labels, data.ids)


def test_independent_members_and_restarts_each_draw_a_key_stream_of_their_own(runs, tmp_path):
    """Member k's restart r runs with seed stream_seed(seed, k, r): exactly that attack alone with that seed (member 0,
    restart 0 keeps the run seed). An image is robust only if it survives every run; records name member and restart."""
    from distributed_ebm.method.noise import stream_seed
    ebm = runs[0]
    members, restarts = MEMBERS[:2], 2
    ens = _records(build(AttackConfig, _tree(ebm, str(tmp_path / "e"), ensemble=members, restarts=restarts)))
    seeds = {(k, r): stream_seed(1, k, r) for k in range(2) for r in range(restarts)}
    assert seeds[0, 0] == 1 and len(set(seeds.values())) == 4
    alone = {(k, r): _records(build(AttackConfig, {**_tree(ebm, str(tmp_path / "a"), **members[k]), "seed": seed}))
             for (k, r), seed in seeds.items()}
    order = sorted(alone)  # member-major: (0, 0), (0, 1), (1, 0), (1, 1)
    for i, rec in enumerate(ens):
        breaker = next((kr for kr in order if not alone[kr][i].robust), None)
        assert (rec.broken_by, rec.broken_restart) == (breaker or (-1, -1))
        m = alone[breaker or order[-1]][i]
        assert (rec.broken_at, rec.final_pred) == (m.broken_at, m.final_pred)
        assert (rec.natural_protocol_correct, rec.natural_defense_pred) == (
            alone[0, 0][i].natural_protocol_correct, alone[0, 0][i].natural_defense_pred)
    # the streams are not the paired ones: some image meets different luck under another stream
    assert any(alone[0, 0][i].broken_at != alone[0, 1][i].broken_at
               or alone[0, 0][i].final_pred != alone[0, 1][i].final_pred
               or not np.array_equal(alone[0, 0][i].adv_image, alone[0, 1][i].adv_image) for i in range(6))


def test_restarts_alone_summary_counts_each_restart(runs, tmp_path):
    ebm = runs[0]
    summary = run_attack(build(AttackConfig, _tree(ebm, str(tmp_path / "r"), restarts=3, eps="0.5/255")), OneProcess(),
                         show=False)
    per = summary["restarts"]
    assert len(per) == 1 and len(per[0]["broken_per_restart"]) == 3
    assert sum(per[0]["broken_per_restart"]) == per[0]["broken"]
    assert per[0]["robust_accuracy"] == summary["robust_accuracy"]
    records = results.read_records(str(tmp_path / "r")).to_pylist()
    assert all((r["broken_restart"] == -1) == (r["broken_at"] == -1) for r in records)
