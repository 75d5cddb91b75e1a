"""APGD (CE and DLR), the exact-gradient EOT mode and re-evaluations of stochastic defenses."""
import pytest
import torch

from distributed_ebm.config import AttackConfig, AttackSettings, load_config
from distributed_ebm.errors import ConfigError
from distributed_ebm.method.attacks import Attack
from distributed_ebm.method.attacks.apgd import APGD
from distributed_ebm.method.defense import dlr
from distributed_ebm.results.records import summarize_records
from distributed_ebm.store.data import subset

from .test_attacks import _run, defended  # noqa: F401  (module fixture


def _robust(attack, data):
    records = _run(attack, data, 50)
    return summarize_records(records, attack.points)


@pytest.mark.parametrize("eps, steps", [(8 / 255, 50), (0.5 / 255, 20)])
def test_apgd_reaches_at_most_pgds_robust_accuracy_on_resnet20(exact_test, resnet20, eps, steps):
    """Same 100 exact test images, same budget; the small budget keeps PGD away from 0%."""
    data = subset(exact_test, count=100)
    pgd = _robust(Attack(resnet20, None, AttackSettings(mode="pgd", eps=eps, step_size=eps / 4, steps=steps)), data)
    for loss in ("ce", "dlr"):
        s = AttackSettings(mode="pgd", optimizer="apgd", loss=loss, eps=eps, steps=steps)
        apgd = _robust(Attack(resnet20, None, s), data)
        assert apgd["natural_protocol_accuracy"] == pgd["natural_protocol_accuracy"]
        assert apgd["robust_accuracy"] <= pgd["robust_accuracy"], (loss, apgd["robust_accuracy"],
                                                                   pgd["robust_accuracy"])
    if eps < 1 / 255:
        assert 0.1 < pgd["robust_accuracy"] < pgd["natural_protocol_accuracy"], "the small budget should discriminate"
    else:
        assert pgd["robust_accuracy"] <= 0.02


def test_dlr_loss():
    z = torch.tensor([[3.0, 1.0, 0.5, 0.0], [3.0, 1.0, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(dlr(z, y), torch.tensor([-(3 - 1) / 2.5, -(0.5 - 3) / 2.5]))
    assert torch.allclose(dlr(7 * z - 4, y), dlr(z, y), atol=1e-6)  # shift and scale invariant


def test_apgd_halves_the_step_and_returns_to_the_best_point_when_the_loss_stalls():
    x_nat = torch.zeros(2, 1, 2, 2)
    upd = APGD(x_nat, "linf", eps=1.0, steps=10)  # first checkpoint after 2 steps
    g = torch.ones_like(x_nat)
    x0 = torch.full_like(x_nat, 0.1)
    x1 = upd.step(x0, g, torch.tensor([1.0, 1.0]))
    assert torch.allclose(x1, torch.ones_like(x1))  # first step: 2 eps, clipped to the ball
    x2 = upd.step(x1, g, torch.tensor([0.5, 2.0]))  # image 0 got worse, image 1 better
    upd.step(x2, g, torch.tensor([0.4, 3.0]))  # checkpoint: image 0 never rose, image 1 rose twice
    assert upd.eta.tolist() == [1.0, 2.0]
    assert torch.equal(upd.prev[0], x0[0]) and torch.equal(upd.prev[1], x2[1])  # image 0 restarted at its best


def test_exact_eot_on_the_papers_ebm_equals_bpda_eot(defended):  # noqa: F811
    """The paper's EBM is piecewise linear: the exact gradient through its chain is BPDA's."""
    data, clf, purifier = defended
    common = dict(eps=1 / 255, step_size=0.5 / 255, steps=3, eot_attack=3, eot_defense=5)
    bpda = Attack(clf, purifier, AttackSettings(mode="bpda_eot", **common), seed=11)(data.floats(), data.labels,
                                                                                     data.ids)
    exact = Attack(clf, purifier, AttackSettings(mode="exact_eot", segment=1, **common), seed=11)(
        data.floats(), data.labels, data.ids)
    assert [r.broken_at for r in exact] == [r.broken_at for r in bpda]
    assert all((a.adv_image == b.adv_image).all() for a, b in zip(exact, bpda))
    assert sum(r.image_steps for r in exact) > sum(r.image_steps for r in bpda)


def test_reevaluations_report_mean_and_worst_case_whatever_the_batching(defended):  # noqa: F811
    data, clf, purifier = defended
    s = AttackSettings(mode="bpda_eot", eps=1 / 255, step_size=0.5 / 255, steps=2, eot_attack=2, eot_defense=1,
                       reevaluations=4)
    one = _run(Attack(clf, purifier, s, seed=3), data, 6)
    assert all(len(r.reeval_correct) == 4 for r in one)
    again = _run(Attack(clf, purifier, s, seed=3), data, 2)
    assert [r.reeval_correct for r in again] == [r.reeval_correct for r in one]
    flags = [r.reeval_correct for r in one]
    summary = summarize_records(one, 4)
    assert summary["reeval_all_right_accuracy"] == sum(all(f) for f in flags) / len(flags)
    assert summary["reeval_all_right_accuracy"] <= summary["reeval_mean_accuracy"] <= max(summary["reeval_accuracies"])
    # the worst case over every judgement: robust under the protocol and right in all R re-judgements
    assert summary["worst_of_all_judgements_accuracy"] == sum(all(r.reeval_correct) and r.robust for r in one) / 6
    assert summary["worst_of_all_judgements_accuracy"] <= min(summary["robust_accuracy"],
                                                              summary["reeval_all_right_accuracy"])
    assert len({tuple(f) for f in flags}) > 1 or len(set(flags[0])) > 1, "fresh chains should disagree somewhere"
    # mode defense: the clean image re-judged R times
    nat = Attack(clf, purifier, AttackSettings(mode="defense", eot_attack=2, eot_defense=1, reevaluations=2), seed=3)
    assert all(len(r.reeval_correct) == 2 for r in nat(data.floats(), data.labels, data.ids))


@pytest.mark.parametrize("override, message", [
    ("attack.reevaluations=3 attack.mode=pgd", "attack.reevaluations needs a defended mode"),
    ("attack.reevaluations=3 attack.eot_defense=0", "set eot_defense >= 1"),
    ("attack.loss=dlr classifier.num_classes=2", "attack.loss=dlr needs at least 3 classes"),
    ("attack.segment=0", "attack.segment = 0"),
    ("attack.optimizer=adam", "attack.optimizer = 'adam'"),
])
def test_bad_attack_settings_fail_early(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(AttackConfig, "jobs/configs/attack_bpda_eot.yaml", override.split())
