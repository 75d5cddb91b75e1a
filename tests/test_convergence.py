"""Has the evaluation converged? The defense's vote (decided at 95% by a sign test between its prediction and its
rival, and how many chains would decide it) and the attack's steps (breaks in the last 20% of them), checked against
cases with a known answer, in one process; the Ray engine gives the same figures (tests/test_ray_evaluate.py)."""
import math
import time

import pytest
import torch

from distributed_ebm.config import AttackConfig, build
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.recipes.attack import run_attack
from distributed_ebm.results.records import chains_to_decide, convergence, sign_test_p
from distributed_ebm.results.report import format_convergence
from distributed_ebm.store.checkpoints import save_ebm

from .conftest import RESNET20, TEST_EXACT, tiny_ebm


def test_a_unanimous_vote_is_decided_an_even_one_never_and_a_close_one_needs_more_chains():
    assert sign_test_p(150, 0) < 1e-40 and sign_test_p(8, 7) == 1.0
    assert chains_to_decide(10, 5, 15) is not None and chains_to_decide(10, 5, 15) > 15  # 10:5 is not decided...
    assert sign_test_p(10, 5) >= 0.05
    n = chains_to_decide(10, 5, 15)
    assert sign_test_p(round(n * 10 / 15), round(n * 5 / 15)) < 0.05  # ...at n chains it is, and not at n - 1
    assert sign_test_p(round((n - 1) * 10 / 15), round((n - 1) * 5 / 15)) >= 0.05
    assert chains_to_decide(5, 5, 10) is None
    c = convergence([[150, 0]] * 3, [[-1, -1]] * 3, [0, -1, -1], 52, 150)
    assert c["natural_vote"] == {"images": 3, "undecided": 0, "undecided_share": 0.0, "chains_to_decide_all": 150}


def test_close_votes_are_costed_in_milliseconds_and_the_float_sign_test_equals_the_exact_one():
    """A 60:59 vote of 150 chains needs about 69,000 chains; an exact big-integer sign test on such counts costs
    minutes per call, which would hold a finished run's summary back. The float sum must equal the exact one."""
    n, k = 5001, 2400
    exact = 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    assert sign_test_p(k, n - k) == pytest.approx(exact, rel=1e-9)
    start = time.perf_counter()
    needed = chains_to_decide(60, 59, 150)
    assert time.perf_counter() - start < 5  # a hang guard: big-integer sums need minutes
    assert 60_000 < needed < 80_000 and sign_test_p(round(needed * 60 / 150), round(needed * 59 / 150)) < 0.05


def test_breaks_in_the_last_fifth_of_the_steps_ask_for_more_steps():
    # 10 steps: point t + 1 is iterate t; the last 20% of the steps (9 and 10) end at points 10 and 11
    early = convergence([None] * 2, [None] * 2, [3, -1], 12, 8)
    late = convergence([None] * 2, [None] * 2, [3, 10], 12, 8)
    assert (early["late_breaks"], early["increase_steps"], early["last_break_point"]) == (0, False, 3)
    assert (late["late_breaks"], late["increase_steps"], late["late_from_point"]) == (1, True, 10)


def _cfg(tmp_path, ebm, purify=None, report=None, **attack):
    return build(AttackConfig, {
        "data": {"path": TEST_EXACT, "count": 4}, "classifier": {"weights": RESNET20}, "ebm": ebm,
        "purify": purify or {"steps": 0}, "attack": {"eot_attack": 4, "eot_defense": 8, **attack},
        "report": report or {}, "output": str(tmp_path / "out"), "mlflow": {"enabled": False}})


def test_identical_chains_always_agree_so_every_vote_is_decided(tmp_path):
    """With K = 0 purifying steps every chain is the image itself: all 8 vote alike, so nothing is undecided."""
    ebm = str(tmp_path / "ebm.pt")
    save_ebm(tiny_ebm(), ebm)
    c = run_attack(_cfg(tmp_path, ebm, mode="defense"), OneProcess("cpu"), show=False)["convergence"]
    assert c["chains"] == 8 and c["natural_vote"]["images"] == 4 and c["natural_vote"]["undecided"] == 0


@pytest.mark.parametrize("steps, late", [(1, True), (10, None)])
def test_a_one_step_attack_that_breaks_images_is_flagged(tmp_path, steps, late):
    """PGD at 8/255 on the undefended ResNet-20: with one step every break is in the last step (flagged);
    with ten, the flag follows where the breaks fell."""
    summary = run_attack(_cfg(tmp_path, None, mode="pgd", steps=steps, step_size="8/255"), OneProcess("cpu"),
                         show=False)
    c = summary["convergence"]
    line = format_convergence(summary)  # no chains vote on an undefended classifier: the line must not count any
    assert "chains per vote" not in line and "no chains vote" in line and "undefended" in line
    assert c["last_break_point"] is not None
    if late is not None:
        assert c["increase_steps"] is late
    else:
        assert c["increase_steps"] == (c["last_break_point"] >= c["late_from_point"])


def test_the_eot_gradient_check_gives_cosine_one_for_identical_estimates_and_less_for_noisy_ones(tmp_path):
    """Known answers: the undefended classifier's gradient is deterministic, so its two estimates are identical
    (cosine 1: one chain would suffice); through noisy chains two independent estimates differ."""
    from distributed_ebm.results.records import gradient_convergence

    check = {"gradient_check": 2}
    g = run_attack(_cfg(tmp_path / "pgd", None, report=check, mode="pgd", steps=1, step_size="1/255", eps="1/255"),
                   OneProcess("cpu"), show=False)["convergence"]["gradient"]
    assert g["images"] == 2 and g["cosine_median"] == pytest.approx(1.0) and g["chains_for_0.9"] == 1  # one suffices
    ebm = str(tmp_path / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), ebm)
    b = run_attack(_cfg(tmp_path / "bpda", ebm, purify={"steps": 3, "noise": 0.3}, report=check, mode="bpda_eot",
                        steps=1, step_size="1/255", eps="1/255"), OneProcess("cpu"),
                   show=False)["convergence"]["gradient"]
    assert b["images"] == 2 and -1 <= b["cosine_median"] < 0.999
    assert gradient_convergence([[0.5, 0.5]], 15)["chains_for_0.9"] == 135  # c = r n / (r n + 1): r = 1/15 at c = 1/2
    assert gradient_convergence([[None, None], None], 15) is None


def test_every_run_draws_its_gallery_from_its_own_chains(tmp_path, capsys):
    """One process and `debm report --gallery`: gallery.png of the first images by id; its purified pictures are
    the run's own chains (replicate 0 of the clean image's check), so drawing it again gives the same pictures."""
    from PIL import Image

    from distributed_ebm.cli import main
    from distributed_ebm.method.noise import ChainKeys
    from distributed_ebm.recipes.attack import gallery_rows
    from distributed_ebm.store.data import read_images

    ebm = str(tmp_path / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), ebm)
    cfg = _cfg(tmp_path, ebm, purify={"steps": 3, "noise": 0.05}, report={"gallery": 3}, mode="bpda_eot", steps=2)
    run_attack(cfg, OneProcess("cpu"), show=False)
    png = Image.open(tmp_path / "out" / "gallery.png")
    assert png.size[0] > 600 and png.size[1] > 400
    rows = gallery_rows(cfg)
    data = read_images(cfg.data)
    assert [r.index for r in rows] == sorted(data.ids.tolist())[:3]
    from distributed_ebm.recipes.attack import build_attack
    defense = build_attack(cfg).defense
    first = data.floats()[:1]
    keys = ChainKeys.replicated(cfg.seed, data.ids[:1], cfg.attack.eot_attack, 0)[0:1]  # the check's replicate 0
    assert (rows[0].purified_clean == defense.purifier(first, keys)[0].numpy()).all()
    assert all(r.natural[1] is not None and 0 < r.natural[1] <= 1 for r in rows)  # the vote shares are recorded
    before = (tmp_path / "out" / "gallery.png").read_bytes()
    assert main(["report", str(tmp_path / "out"), "--gallery", "3"]) == 0
    assert f"gallery: {tmp_path}/out/gallery.png" in capsys.readouterr().out
    assert (tmp_path / "out" / "gallery.png").read_bytes() == before


def test_vote_counts_belong_to_the_averaged_prediction_not_to_the_most_voted_class():
    """Three chains vote class 0 by a hair, two vote class 1 by a mile: the averaged logits predict 1. The counts a
    record keeps are those of the prediction (1), of the label, and of the strongest other class (0)."""
    from distributed_ebm.method.attacks.engine import vote_counts

    per_chain = torch.tensor([[1.0, 0.9, 0], [1.0, 0.9, 0], [1.0, 0.9, 0], [0, 9.0, 0], [0, 9.0, 0]])
    counts = torch.nn.functional.one_hot(per_chain.argmax(1), 3).sum(0, keepdim=True)  # [[3, 2, 0]]
    pred = per_chain.mean(0, keepdim=True).argmax(1)
    assert pred.item() == 1
    assert vote_counts(counts, pred, torch.tensor([2])).tolist() == [[2, 0, 3]]
    assert vote_counts(counts, pred, torch.tensor([1])).tolist() == [[2, 2, 3]]
    # the averaged decision is not decided by chains that mostly vote for another class, however many
    assert convergence([[20, 20, 30]], [None], [-1], 1, 50)["natural_vote"]["undecided"] == 1
    assert convergence([[30, 30, 2]], [None], [-1], 1, 32)["natural_vote"]["undecided"] == 0  # right, decided
    # wrong predictions are weighed against the label: 14 for the prediction against 2 for the label is decided
    assert convergence([[14, 2, 2]], [None], [-1], 1, 16)["natural_vote"]["undecided"] == 0


def test_an_attacks_vote_shares_are_the_chains_voting_for_its_prediction(tmp_path):
    """The records' counts, checked against the defense's own chains (the same keys, counted here): the clean image's
    vote is its confirmation call (1), with `eot_defense` chains."""
    from distributed_ebm.config import AttackSettings
    from distributed_ebm.method.attacks import Attack
    from distributed_ebm.method.defense import Purifier

    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    images, labels, ids = torch.rand(6, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6) + 10
    attack = Attack(clf, Purifier(tiny_ebm(), 2, 0.0, 0.5), AttackSettings(mode="defense", eot_attack=4, eot_defense=9),
                    seed=3)
    records = attack(images, labels, ids)
    logits, counts = attack.defense.logits(images, ids, seed=3, call=1, replicates=9, votes=True)
    assert counts.min() >= 0 and (counts.max(1).values < 9).any()  # the chains disagree: the test can tell
    for r, z, c, y in zip(records, logits, counts, labels.tolist()):
        pred = int(z.argmax())
        assert r.natural_defense_pred == pred
        assert r.natural_votes == [int(c[pred]), int(c[y]), int(max(c[k] for k in range(4) if k != pred))]
