import pytest
import torch

from distributed_ebm.store import storage
from distributed_ebm.config import TrainClassifierConfig, TrainEBMConfig, build
from distributed_ebm.store.data import select
from distributed_ebm.method.nets import load_classifier, load_ebm
from distributed_ebm.method.training import EBMTraining, TrainingDiverged, augment, train_classifier, train_ebm

from .conftest import TEST_EXACT


def _cfg(tmp_path, **kw):
    tree = {"ebm": {"width": 4}, "langevin": {"steps": 3}, "iterations": 6, "batch_size": 8, "bank_size": 32,
            "sgd_start": 3, "checkpoint_every": 3, "output": str(tmp_path / "run"), **kw}
    return build(TrainEBMConfig, tree)


@pytest.fixture(scope="module")
def small(exact_test):
    return select(exact_test, count=64)


def test_ebm_trains_bank_moves_and_optimizer_switches(tmp_path, small):
    run = EBMTraining(_cfg(tmp_path), small)
    bank0 = run.bank.states.clone()
    w0 = [p.detach().clone() for p in run.ebm.parameters()]
    kinds = []
    for _ in range(5):
        m = run.step()
        kinds.append(type(run.optimizer).__name__)
        assert all(k in m for k in ("energy_diff", "energy_pos", "energy_neg", "grad_norm", "bank_age"))
    assert kinds == ["Adam", "Adam", "Adam", "SGD", "SGD"]
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 * 0.01 ** 2 / 2)
    assert run.optimizer.param_groups[0]["momentum"] == 0
    changed = (run.bank.states != bank0).flatten(1).any(1)
    assert changed.sum() > 8 and run.bank.steps.sum() == 5 * 8 * 3
    assert torch.equal(changed, run.bank.steps > 0)
    assert any(not torch.equal(a, b) for a, b in zip(w0, run.ebm.parameters()))


def test_resumed_run_equals_uninterrupted(tmp_path, small):
    straight = train_ebm(_cfg(tmp_path / "a"), data=small, show=False)
    train_ebm(_cfg(tmp_path / "b", iterations=3), data=small, show=False)
    resumed = train_ebm(_cfg(tmp_path / "b"), data=small, show=False)  # same output: continues from 3
    assert resumed.iteration == straight.iteration == 6 and resumed.phase == "sgd"
    for a, b in zip(straight.ebm.state_dict().values(), resumed.ebm.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.bank.states, resumed.bank.states)
    # the saved EBM reloads to the same weights and outputs (up to the conv layout's rounding)
    loaded = load_ebm(str(tmp_path / "a" / "run" / "ebm.pt"))
    for a, b in zip(loaded.state_dict().values(), straight.ebm.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded(x), straight.ebm(x), atol=1e-6)


def test_rejuvenation_restarts_chains(tmp_path, small):
    run = EBMTraining(_cfg(tmp_path, rejuvenation=1.0, bank_init="data"), small)
    run.step()
    run.step()
    assert run.bank.steps.max() == 3  # every drawn chain restarted before its 3 steps


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, small):
    cfg = _cfg(tmp_path, iterations=3)
    train_ebm(cfg, data=small, show=False)
    ckpt = storage.join(cfg.output, "checkpoint.pt")
    before = storage.read_bytes(ckpt)
    poisoned = select(small, count=64)
    poisoned.images = poisoned.images.clone()
    poisoned.images[:] = float("nan")
    with pytest.raises(TrainingDiverged, match="EBM loss is nan"):
        train_ebm(_cfg(tmp_path, iterations=6), data=poisoned, show=False)
    assert storage.read_bytes(ckpt) == before


def test_bad_sizes_fail_early(tmp_path, small):
    with pytest.raises(ValueError, match="batch_size = 100 but the training data hold only 64"):
        EBMTraining(_cfg(tmp_path, batch_size=100), small)
    with pytest.raises(ValueError, match="bank_size = 4 is smaller than batch_size = 8"):
        EBMTraining(_cfg(tmp_path, bank_size=4), small)


def test_augment_crops_and_flips():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    y = augment(x, g)
    assert y.shape == x.shape
    # every output pixel is an input pixel or black padding
    values = set(x.flatten().tolist()) | {-1.0}
    assert set(y[:4].flatten().tolist()) <= values
    assert not torch.equal(x, y)


def test_classifier_trains_and_resumes(tmp_path):
    def cfg(out, epochs):
        return build(TrainClassifierConfig, {
            "data": {"path": TEST_EXACT, "count": 100}, "test_data": {"path": TEST_EXACT, "indices": list(range(900, 1000))},
            "classifier": {"arch": "wrn", "wrn_depth": 10, "wrn_widen": 1, "weights": None},
            "epochs": epochs, "batch_size": 50, "lr_milestones": [1], "output": str(tmp_path / out)})
    straight = train_classifier(cfg("a", 2), show=False)
    train_classifier(cfg("b", 1), show=False)
    resumed = train_classifier(cfg("b", 2), show=False)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for a, b in zip(straight["classifier"].state_dict().values(), resumed["classifier"].state_dict().values()):
        assert torch.equal(a, b)
    clf = load_classifier("wrn", str(tmp_path / "a" / "classifier.pt"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(clf(x), straight["classifier"](x))


def test_a_rejuvenated_start_and_its_chains_first_noise_are_independent_draws():
    """Iteration t's chain draws its step-0 noise with call t; a slot restarted at iteration t must not draw
    its uniform start from the same Philox words (before: the start's log and the noise's radius were the same
    number, correlation -1)."""
    from distributed_ebm.method.bank import ImageBank
    from distributed_ebm.method.noise import ChainKeys

    t, shape = 17, (3, 4, 4)
    bank = ImageBank(2000, shape, seed=3)
    slots = torch.arange(2000)
    start = (bank.read(slots, torch.ones(2000, dtype=torch.bool), call=t) + 1) / 2  # U(0, 1), draw order = C H W
    z = ChainKeys(3, slots, torch.zeros_like(slots), call=t).normal(0, (4, 4, 3)).flatten(1)  # the step's draw order
    radius = z[:, 0::4] ** 2 + z[:, 1::4] ** 2  # Box-Muller: -2 log of the block's first uniform
    corr = torch.corrcoef(torch.stack([start.flatten(1)[:, 0::4].log().flatten(), radius.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.03
    assert torch.equal(bank.read(slots[:5]), bank.states[:5])  # the initial starts are as they were
