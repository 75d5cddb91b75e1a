import copy

import numpy as np
import pytest
import torch

from distributed_ebm.config import AttackSettings
from distributed_ebm.method.attacks import Attack, project, random_start
from distributed_ebm.method.attacks.pgd import ascent_step
from distributed_ebm.method.defense import EOTDefense, Purifier
from distributed_ebm.results.records import accuracy_curve, summarize_records, wilson_interval
from distributed_ebm.store.data import subset

from .conftest import tiny_ebm

EPS = 8 / 255


def _run(attack, data, batch):
    out = []
    for i in range(0, len(data), batch):
        out += attack(data.floats()[i:i + batch], data.labels[i:i + batch], data.ids[i:i + batch])
    return out


@pytest.mark.parametrize("norm, eps, step, ceiling", [("linf", 8 / 255, 2 / 255, 0.02), ("l2", 0.5, 0.1, 0.05)])
def test_pgd_drives_the_undefended_resnet20_to_zero(exact_test, resnet20, norm, eps, step, ceiling):
    data = subset(exact_test, count=100)
    attack = Attack(resnet20, None, AttackSettings(mode="pgd", norm=norm, eps=eps, step_size=step, steps=50), seed=0)
    records = _run(attack, data, 50)
    s = summarize_records(records, attack.points)
    assert s["natural_protocol_accuracy"] > 0.9 and s["natural_defense_accuracy"] == s["natural_protocol_accuracy"]
    assert s["robust_accuracy"] <= ceiling
    assert s["accuracy_curve"][0] == s["natural_protocol_accuracy"] and s["accuracy_curve"][-1] == s["robust_accuracy"]


def test_adversarial_images_stay_in_budget_and_pixels(exact_test, resnet20):
    data = subset(exact_test, count=10)
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        attack = Attack(resnet20, None, AttackSettings(mode="pgd", norm=norm, eps=eps, step_size=eps / 4, steps=5),
                        seed=0)
        for r, x in zip(attack(data.floats(), data.labels, data.ids), data.floats()):
            delta = torch.from_numpy(r.adv_image) - x
            size = delta.abs().max() if norm == "linf" else delta.norm()
            assert size <= 2 * eps + 1e-5 and r.adv_image.min() >= -1 and r.adv_image.max() <= 1
    x, x_nat = torch.rand(4, 3, 8, 8) * 4 - 2, torch.rand(4, 3, 8, 8) * 2 - 1
    p = project(x, x_nat, "l2", 0.3)
    assert ((p - x_nat).flatten(1).norm(dim=1) <= 0.3 + 1e-6).all() and p.abs().max() <= 1
    start = random_start(x_nat, torch.arange(4), 0, "linf", 0.1)
    assert (start - x_nat).abs().max() <= 0.1 + 1e-6 and not torch.equal(start, x_nat)


def _double(module):
    return copy.deepcopy(module).double()


@pytest.fixture(scope="module")
def defended(exact_test, resnet20):
    """Double precision, so batch composition cannot flip the sign of a tiny gradient component."""
    data = subset(exact_test, count=6)
    data.data = data.floats().double()
    return data, _double(resnet20), Purifier(_double(tiny_ebm(scale=20)), steps=2, step_size=1.0, noise=0.05)


def _reference(clf, purifier, s: AttackSettings, data, seed):
    """The paper's protocol written plainly: one image at a time, never leaving the batch."""
    defense = EOTDefense(clf, purifier, average=s.average)
    eps, alpha = 2 * s.eps, 2 * s.step_size
    out = []
    for k in range(len(data)):
        x_nat, y, i = data.floats()[k:k + 1], data.labels[k:k + 1], data.ids[k:k + 1]

        def judge(x, point, logits=None):
            if logits is None:
                logits = defense.logits(x, i, seed=seed, call=2 * point, replicates=s.eot_attack)
            pred = int(logits.argmax(1))
            if pred != int(y) and s.eot_defense:
                pred = int(defense.logits(x, i, seed=seed, call=2 * point + 1, replicates=s.eot_defense).argmax(1))
            return pred != int(y), pred, float(torch.nn.functional.cross_entropy(logits, y))

        broken, pred, _ = judge(x_nat, 0)
        vote = int(defense.logits(x_nat, i, seed=seed, call=1, replicates=s.eot_defense).argmax(1))
        rec = {"natural_pred": pred, "vote": vote, "broken_at": 0 if broken else -1, "final_pred": pred,
               "adv": x_nat[0], "loss": -float("inf")}
        x = random_start(x_nat, i, seed, s.norm, eps)
        for t in range(s.steps + 1):
            point = t + 1
            if t < s.steps:
                logits, g = defense.logits_and_grad(x, y, i, seed=seed, call=2 * point, replicates=s.eot_attack)
            else:
                logits, g = defense.logits(x, i, seed=seed, call=2 * point, replicates=s.eot_attack), None
            wrong, pred, loss = judge(x, point, logits)
            if rec["broken_at"] == -1:
                rec["final_pred"] = pred
                if wrong or loss > rec["loss"]:  # the break's iterate, else the most adversarial one
                    rec["adv"], rec["loss"] = x[0], loss
                if wrong:
                    rec["broken_at"] = point
            if g is not None:
                x = project(ascent_step(x, g, s.norm, alpha), x_nat, s.norm, eps)
        out.append(rec)
    return out


def test_bpda_eot_follows_the_papers_protocol_whatever_the_batching(defended):
    data, clf, purifier = defended
    s = AttackSettings(mode="bpda_eot", eps=1 / 255, step_size=0.5 / 255, steps=3, eot_attack=3, eot_defense=5)
    ref = _reference(clf, purifier, s, data, seed=11)
    seen = {r["broken_at"] for r in ref}
    assert {-1, 0} < seen, "want natural errors, breaks under attack and robust images"
    for batch in (6, 4, 1):
        records = _run(Attack(clf, purifier, s, seed=11, chunk_size=5), data, batch)
        assert [r.broken_at for r in records] == [r["broken_at"] for r in ref]
        assert [r.natural_protocol_pred for r in records] == [r["natural_pred"] for r in ref]
        assert [r.natural_defense_pred for r in records] == [r["vote"] for r in ref]
        assert [r.final_pred for r in records] == [r["final_pred"] for r in ref]
        for r, e in zip(records, ref):
            assert np.allclose(r.adv_image, e["adv"].numpy(), atol=1e-9)
            assert r.index == int(data.ids[records.index(r)])


def test_broken_images_leave_the_batch(exact_test, resnet20):
    rows = []
    counting = torch.nn.Sequential(resnet20)
    counting.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    data = subset(exact_test, count=20)
    attack = Attack(counting, None, AttackSettings(mode="pgd", steps=20), seed=0)
    records = attack(data.floats(), data.labels, data.ids)
    assert sum(r.robust for r in records) == 0
    assert sum(rows) < 0.4 * 20 * attack.points  # without dropping: 20 images at every point
    curve = accuracy_curve([r.broken_at for r in records], attack.points)
    assert all(a >= b for a, b in zip(curve, curve[1:])), "broken stays broken"


def test_transfer_and_defense_modes(defended):
    data, clf, purifier = defended
    s = AttackSettings(mode="transfer", eps=EPS, steps=3, eot_attack=2, eot_defense=3)
    records = Attack(clf, purifier, s, seed=5)(data.floats(), data.labels, data.ids)
    assert {r.broken_at for r in records} <= {-1, 0, s.steps + 2 - 1}
    # the transfer iterate is plain PGD on the classifier, judged by the defense at the end
    x_nat = data.floats()
    x = random_start(x_nat, data.ids, 5, "linf", 2 * EPS)
    for _ in range(s.steps):
        x = x.detach().requires_grad_(True)
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(clf(x), data.labels, reduction="sum"), x)[0]
        x = project(ascent_step(x.detach(), g, "linf", 2 * s.step_size), x_nat, "linf", 2 * EPS)
    for k, r in enumerate(records):
        if r.broken_at != 0:
            assert np.allclose(r.adv_image, x[k].numpy(), atol=1e-9)
    nat = Attack(clf, purifier, AttackSettings(mode="defense", eot_attack=2, eot_defense=3), seed=5)
    assert nat.points == 1
    natural = nat(data.floats(), data.labels, data.ids)
    assert [r.natural_protocol_pred for r in natural] == [r.natural_protocol_pred for r in records]


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(10, 10)[1] == pytest.approx(1)


def test_per_image_tensors_share_the_images_device(exact_test, resnet20):
    """The engine's device rule, checked where it is enforced; the CUDA run itself is in test_gpu.py.
    `meta` tensors stand for 'another device' on a CPU-only machine: nothing may run on them."""
    from distributed_ebm.method.defense import same_device

    x, y, ids = exact_test.floats()[:2], exact_test.labels[:2], exact_test.ids[:2]
    same_device(x=x, labels=y, ids=ids)
    with pytest.raises(ValueError,
                       match="ids is on meta but x on cpu: per-image tensors must share the images' device"):
        same_device(x=x, labels=y, ids=ids.to("meta"))
    defense = EOTDefense(resnet20, Purifier(tiny_ebm(), steps=1))
    with pytest.raises(ValueError, match="ids is on meta but x on cpu"):
        defense.logits(x, ids.to("meta"), seed=0, call=0, replicates=2)
    with pytest.raises(ValueError, match="labels is on meta but x on cpu"):
        defense.logits_and_grad(x, y.to("meta"), ids, seed=0, call=0, replicates=2)
    # the engine's entry takes labels and ids from anywhere (here a list and a numpy array)
    attack = Attack(resnet20, Purifier(tiny_ebm(), steps=1),
                    AttackSettings(mode="defense", eot_attack=2, eot_defense=2))
    records = attack(x, y.numpy(), ids.tolist())
    assert [r.index for r in records] == ids.tolist() and [r.label for r in records] == y.tolist()
    # the check's 2 chains, and the defense's own 2-chain vote on every clean image (the confirmation where the
    # check is wrong)
    assert all(r.image_steps == 2 * 1 + 2 * 1 and r.confirm_image_steps == 2 * 1 for r in records)


class _CoinFlip(torch.nn.Module):
    """Logits (100 p, -100 p) of the first pixel p: behind a noise-only chain started at a zero image, each
    chain votes class 0 (the label) with probability 1/2, and so does any average of the chains' logits."""

    def forward(self, x):
        p = x[:, 0, 0, 0]
        return torch.stack([100 * p, -100 * p], dim=1)


def test_the_defenses_own_natural_figure_and_the_protocols_two_chances():
    """An image the defense gets right half the time: its own vote is right on about half of 400 such images;
    the protocol's (check right, or a fresh confirmation right) on about 3/4 of them; never the other way."""
    n = 400
    images, labels, ids = torch.zeros(n, 3, 4, 4), torch.zeros(n, dtype=torch.int64), torch.arange(n) * 7 + 3
    s = AttackSettings(mode="defense", eot_attack=1, eot_defense=3)
    records = Attack(_CoinFlip(), Purifier(None, steps=1, step_size=0.0, noise=0.1), s, seed=2)(images, labels, ids)
    summary = summarize_records(records, 1)
    assert abs(summary["natural_defense_accuracy"] - 0.5) < 0.08, summary
    assert abs(summary["natural_protocol_accuracy"] - 0.75) < 0.07, summary
    assert all(r.natural_protocol_correct for r in records if r.natural_defense_correct)
    assert all(r.natural_defense_pred in (0, 1) for r in records)


def test_an_unbroken_images_record_keeps_its_most_adversarial_iterate(exact_test, resnet20):
    """Not the last iterate: the checked iterate of highest loss, which re-evaluation then judges."""
    data = subset(exact_test, count=12)
    s = AttackSettings(mode="pgd", eps=1 / 255, step_size=1 / 255, steps=6)
    records = Attack(resnet20, None, s, seed=4)(data.floats(), data.labels, data.ids)
    x_nat, y = data.floats(), data.labels
    x = random_start(x_nat, data.ids, 4, "linf", 2 / 255)
    iterates, losses = [], []
    for t in range(s.steps + 1):
        xg = x.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(resnet20(xg), y, reduction="none")
        iterates.append(x.detach())
        losses.append(loss.detach())
        if t < s.steps:
            (g,) = torch.autograd.grad(loss.sum(), xg)
            x = project(ascent_step(x.detach(), g, "linf", 2 / 255), x_nat, "linf", 2 / 255)
    losses = torch.stack(losses)  # iterates x images
    not_last = 0
    for k, r in enumerate(records):
        if r.robust:
            best = int(losses[:, k].argmax())
            assert np.allclose(r.adv_image, iterates[best][k].numpy(), atol=1e-6)
            assert r.adv_loss == pytest.approx(float(losses[best, k]), rel=1e-5)
            not_last += best != s.steps
    assert not_last >= 1, "the case should have an image whose last iterate is not its most adversarial"


def test_a_longer_attack_repeats_the_shorter_ones_steps(defended):
    """RESULTS.md bounds the paper's 50-step attack by the 10-step one: the first steps of a longer run are the
    shorter run's steps (each point keyed by its index), so every break comes at the same point and the longer
    run's robust images are a subset of the shorter one's."""
    data, clf, purifier = defended
    runs = {n: _run(Attack(clf, purifier, AttackSettings(mode="bpda_eot", eps=2 / 255, step_size=0.5 / 255, steps=n,
                                                         eot_attack=3, eot_defense=5), seed=11), data, 6)
            for n in (2, 5)}
    short, long = runs[2], runs[5]
    assert any(r.broken_at > 0 for r in long), "want breaks under attack"
    for s, lg in zip(short, long):
        if s.broken_at != -1:
            assert lg.broken_at == s.broken_at
        else:
            assert lg.broken_at == -1 or lg.broken_at > 2 + 1
    assert sum(r.robust for r in long) <= sum(r.robust for r in short)
