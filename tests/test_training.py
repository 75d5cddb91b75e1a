import pytest
import torch

from distributed_ebm.config import TrainClassifierConfig, TrainEBMConfig, build
from distributed_ebm.local.train import LocalTraining, train_classifier, train_ebm
from distributed_ebm.method.training import TrainingDiverged, augment
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import load_checkpoint, load_classifier
from distributed_ebm.store.data import subset
from distributed_ebm.store.released import load_ebm

from .conftest import TEST_EXACT


def _cfg(tmp_path, **kw):
    tree = {"ebm": {"width": 4}, "langevin": {"steps": 3}, "iterations": 6, "batch_size": 8, "bank_size": 32,
            "sgd_start": 3, "checkpoint_every": 3, "output": str(tmp_path / "run"), **kw}
    return build(TrainEBMConfig, tree)


@pytest.fixture(scope="module")
def small(exact_test):
    return subset(exact_test, count=64)


def test_ebm_trains_bank_moves_and_optimizer_switches(tmp_path, small):
    run = LocalTraining(_cfg(tmp_path), small)
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
    # the checkpoint is an EBM checkpoint: it reloads to the same weights and outputs (up to the conv layout's rounding)
    loaded = load_ebm(str(tmp_path / "a" / "run" / "ckpt.pt"))
    for a, b in zip(loaded.state_dict().values(), straight.ebm.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.allclose(loaded(x), straight.ebm(x), atol=1e-6)


def test_rejuvenation_restarts_chains(tmp_path, small):
    run = LocalTraining(_cfg(tmp_path, rejuvenation=1.0, bank_init="data"), small)
    run.step()
    run.step()
    assert run.bank.steps.max() == 3  # every drawn chain restarted before its 3 steps


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, small):
    # an absurd SGD step makes the energies blow up within a few iterations, after some checkpoints
    cfg = _cfg(tmp_path, iterations=40, checkpoint_every=1, sgd_start=0, sgd_lr=1e6)
    with pytest.raises(TrainingDiverged, match="EBM loss is (nan|inf|-inf)"):
        train_ebm(cfg, data=small, show=False)
    state = load_checkpoint(storage.join(cfg.output, "ckpt.pt"))
    bank = storage.load_torch(storage.join(cfg.output, "bank-0.pt"))
    assert 1 <= state["iteration"] < 40
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values()) and torch.isfinite(bank["states"]).all()
    resumed = LocalTraining(cfg, small, None, "cpu", state, cfg.output)  # the last good checkpoint resumes
    assert resumed.iteration == state["iteration"]


def test_bad_sizes_fail_early(tmp_path, small):
    with pytest.raises(ValueError, match="batch_size = 100 but the training data hold only 64"):
        LocalTraining(_cfg(tmp_path, batch_size=100), small)
    with pytest.raises(ValueError, match="bank_size = 4 is smaller than batch_size = 8"):
        LocalTraining(_cfg(tmp_path, bank_size=4), small)


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
            "data": {"path": TEST_EXACT, "count": 100},
            "test_data": {"path": TEST_EXACT, "indices": list(range(900, 1000))},
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


def test_the_classifier_training_checkpoint_round_trips_through_store_checkpoints(tmp_path):
    """Save and resume through the one module, by its named keys; a folder written under the Ray entry's old
    file name resumes too, and an empty folder is a fresh start (or one clear line where a checkpoint is due)."""
    from distributed_ebm.errors import InputError
    from distributed_ebm.method.training import classifier_optimizer
    from distributed_ebm.store import checkpoints as ck

    cfg = build(TrainClassifierConfig, {"data": {"path": TEST_EXACT}, "lr_milestones": [1],
                                        "output": str(tmp_path / "out")})

    def fresh(seed):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        return (net, *classifier_optimizer(cfg, net))

    net, opt, sched = fresh(0)
    for _ in range(2):  # momentum buffers and a scheduler past its milestone
        opt.zero_grad()
        net(torch.randn(5, 3, 2, 2)).square().mean().backward()
        opt.step()
        sched.step()
    history = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    ck.save_classifier_training(str(tmp_path / "a"), cfg, 2, net, opt, sched, history)
    saved = storage.load_torch(str(tmp_path / "a" / ck.CLASSIFIER_CKPT))
    assert saved[ck.KIND_KEY] == ck.CLASSIFIER_TRAINING and saved[ck.EPOCH_KEY] == 2
    assert TrainClassifierConfig.model_validate(__import__("yaml").safe_load(saved[ck.CONFIG_KEY])) == cfg

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "state.pt").write_bytes((tmp_path / "a" / ck.CLASSIFIER_CKPT).read_bytes())
    for folder in ("a", "old"):
        net2, opt2, sched2 = fresh(1)
        assert ck.load_classifier_training(str(tmp_path / folder), net2, opt2, sched2) == (2, history)
        for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
            assert torch.equal(a, b)
        assert sched2.state_dict() == sched.state_dict() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for a, b in zip(opt.state.values(), opt2.state.values()):
            assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert ck.load_classifier_training(str(tmp_path / "none"), *fresh(2)) == (0, [])
    with pytest.raises(InputError, match="no classifier training checkpoint"):
        ck.load_classifier_training(str(tmp_path / "none"), *fresh(2), missing_ok=False)


def test_a_rejuvenated_start_and_its_chains_first_noise_are_independent_draws():
    """Iteration t's chain draws its step-0 noise with call t; a slot restarted at iteration t must not draw
    its uniform start from the same Philox words (with them, the start's log and the noise's radius would be the
    same number, correlation -1)."""
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


def plain_training(cfg, data, iterations: int):
    """The paper's training loop written out in the test from the method's parts (bank, draws, chain keys, Langevin
    chain, network): what every entry must compute, recomputed in the same process, so the comparison is exact on
    any CPU's kernels."""
    from distributed_ebm.method.bank import ImageBank
    from distributed_ebm.method.langevin import langevin
    from distributed_ebm.method.noise import ChainKeys
    from distributed_ebm.method.training import iteration_draws, new_ebm

    shape = tuple(data.data.shape[1:])
    ebm, lv, temperature = new_ebm(cfg), cfg.langevin, cfg.langevin.noise ** 2 / 2
    bank = ImageBank(cfg.bank_size, shape, cfg.bank_init, cfg.seed, data.data)
    optimizer, losses = None, []
    for t in range(iterations):
        if t == 0:
            optimizer = torch.optim.Adam(ebm.parameters(), lr=cfg.adam_lr)
        if t == cfg.sgd_start:
            optimizer = torch.optim.SGD(ebm.parameters(), lr=cfg.sgd_lr * temperature)
        d = iteration_draws(cfg, t, len(bank), len(data), shape)
        start = bank.read(d.slots, d.restart, call=t)
        negatives = langevin(ebm, start, ChainKeys(cfg.seed, d.slots, torch.zeros_like(d.slots), call=t), lv.steps,
                             lv.step_size, lv.noise)
        bank.write(d.slots, negatives, lv.steps, d.restart)
        positives = (data.floats(d.rows) + d.noise).contiguous(memory_format=torch.channels_last)
        f = ebm(torch.cat([positives, negatives]))
        loss = (f[:len(positives)].mean() - f[len(positives):].mean()) / temperature
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return ebm, bank, losses


def test_each_entry_computes_the_plain_training_loop(tmp_path, small):
    """The single-process entry (checkpoints, bank saved) and the standalone one (card, no bank saved) run the
    plain loop exactly: bit for bit against it, recomputed here, whatever the CPU's vector kernels."""
    from distributed_ebm.config import StandaloneTrainConfig

    tree = {"ebm": {"width": 4}, "langevin": {"steps": 3}, "iterations": 6, "batch_size": 8, "bank_size": 32,
            "sgd_start": 3, "sgd_lr": 0.01, "rejuvenation": 0.25, "checkpoint_every": 3, "log_every": 1}
    cfg = build(TrainEBMConfig, {**tree, "output": str(tmp_path / "single")})
    ebm, bank, losses = plain_training(cfg, small, 6)
    single = train_ebm(cfg, data=small, show=False)
    gpu_job = LocalTraining(build(StandaloneTrainConfig, tree), small, str(tmp_path / "gpu"), keep_bank=False,
                            card=True,
                            log=lambda _: None)
    gpu_job.run(6, show=False)
    assert torch.isfinite(bank.states).all() and len(set(losses)) == 6  # the reference itself trained
    for run in (single, gpu_job):
        for (name, want), got in zip(ebm.state_dict().items(), run.ebm.state_dict().values()):
            assert torch.equal(got, want), name
        assert torch.equal(run.bank.states, bank.states) and torch.equal(run.bank.steps, bank.steps)
        assert run.history["loss"] == losses


def test_every_training_setting_is_named_as_changing_results_or_not():
    """One table (store/checkpoints.py): a new setting fails here until it is named in one of the two lists, so
    a resume can never silently mix runs that differ in it."""
    from distributed_ebm.store.checkpoints import FREE_KEYS, RESULT_KEYS

    assert not set(RESULT_KEYS) & set(FREE_KEYS)
    assert set(TrainEBMConfig.model_fields) == set(RESULT_KEYS) | set(FREE_KEYS)


def test_precision_is_part_of_the_fingerprint_and_bf16_chains_train(tmp_path, small):
    """bf16 autocast of the EBM inside the chains is a setting that changes results: a checkpoint trained in one
    arithmetic refuses to resume in another; a checkpoint written before the setting existed counts as float32."""
    from distributed_ebm.config import StandaloneTrainConfig, load_config
    from distributed_ebm.errors import InputError
    from distributed_ebm.store.checkpoints import check_fingerprint, settings_fingerprint

    cfg = _cfg(tmp_path, iterations=2, checkpoint_every=2)
    train_ebm(cfg, data=small, show=False)
    state = load_checkpoint(storage.join(cfg.output, "ckpt.pt"))
    assert state["training"]["fingerprint"]["precision"] == "float32"
    bf16 = _cfg(tmp_path, iterations=4, checkpoint_every=2, precision="bf16")
    with pytest.raises(InputError, match=r"precision=float32; this run has precision=bf16"):
        train_ebm(bf16, data=small, show=False)
    # the committed GPU checkpoint (written before the setting) resumes in float32, and only there
    gpu = load_checkpoint("models/ebm-cifar10-gpu/ckpt.pt")
    assert "precision" not in gpu["training"]["fingerprint"]
    paper = load_config(StandaloneTrainConfig, "jobs/configs/train_ebm_cifar10.yaml")
    check_fingerprint(gpu["training"]["fingerprint"], settings_fingerprint(paper), "gpu")
    with pytest.raises(InputError, match="precision=bf16"):
        check_fingerprint(gpu["training"]["fingerprint"], settings_fingerprint(paper.model_copy(
            update={"precision": "bf16"})), "gpu")
    # bf16 chains: the same draws, other arithmetic in the EBM's gradient; negatives close to float32's, not equal
    runs = [LocalTraining(_cfg(tmp_path / p, precision=p), small) for p in ("float32", "bf16")]
    for run in runs:
        run.step()
    a, b = (r.bank.states for r in runs)
    assert torch.isfinite(b).all() and not torch.equal(a, b) and (a - b).abs().max() < 0.05
