"""The EBM's activation (ebm.activation): each trains, purifies and round-trips; checkpoints record it."""
import pytest
import torch

from distributed_ebm.config import AttackConfig, TrainEBMConfig, build
from distributed_ebm.errors import InputError
from distributed_ebm.local.train import LocalTraining
from distributed_ebm.method.defense import Purifier
from distributed_ebm.method.nets import EBM
from distributed_ebm.method.nets.ebm import SoftLeakyReLU
from distributed_ebm.method.noise import ChainKeys
from distributed_ebm.recipes.attack import build_attack
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import save_ebm
from distributed_ebm.store.data import ImageSet
from distributed_ebm.store.released import load_ebm

from .conftest import RESNET20


def test_soft_lrelu_is_mefas_formula():
    act = SoftLeakyReLU(0.49, 0.01)
    x = torch.tensor([-3.0, -0.01, 0.0, 0.02, 5.0], dtype=torch.float64)
    expected = 0.51 * x + 0.49 * torch.sqrt(x ** 2 + 1e-4) - 0.49 * 0.01
    assert torch.allclose(act(x), expected, atol=1e-15) and act(torch.zeros(1)).item() == 0
    # slopes 1 on the right, 1 - 2a = 0.02 on the left
    xs = torch.tensor([-50.0, 50.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(act(xs).sum(), xs)
    assert g.tolist() == pytest.approx([0.02, 1.0], abs=1e-6)


@pytest.mark.parametrize("activation", ["lrelu", "soft_lrelu", "silu"])
def test_each_activation_trains_purifies_and_round_trips(tmp_path, activation):
    torch.manual_seed(0)
    data = ImageSet(torch.rand(8, 3, 8, 8) * 2 - 1, torch.zeros(8, dtype=torch.int64), torch.arange(8))
    cfg = build(TrainEBMConfig, {"data": {"image_size": 8}, "ebm": {"width": 2, "image_size": 8,
                "activation": activation, "soft_eps": 0.05}, "langevin": {"steps": 2}, "iterations": 1,
                "batch_size": 4, "bank_size": 8, "output": str(tmp_path)})
    run = LocalTraining(cfg, data)
    before = [p.detach().clone() for p in run.ebm.parameters()]
    assert torch.isfinite(torch.tensor(run.step()["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, run.ebm.parameters()))
    kinds = {type(m).__name__ for m in run.ebm.modules()}
    assert {"lrelu": "LeakyReLU", "soft_lrelu": "SoftLeakyReLU", "silu": "SiLU"}[activation] in kinds

    url = str(tmp_path / "ebm.pt")
    save_ebm(run.ebm, url)
    loaded = load_ebm(url, image_size=8, activation=activation, soft_eps=0.05)
    assert loaded.activation_spec() == run.ebm.activation_spec() == storage.load_torch(url)["activation"]
    x = data.floats()[:3]
    keys = ChainKeys.replicated(0, torch.arange(3), 1)
    a, b = Purifier(run.ebm, 3)(x, keys), Purifier(loaded, 3)(x, keys)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, x, atol=1e-3)
    assert torch.allclose(loaded(x), run.ebm(x), atol=1e-6)


def test_a_checkpoint_without_activation_is_the_papers_lrelu(tmp_path):
    ebm = EBM(width=2, image_size=8)
    url = str(tmp_path / "old.pt")
    storage.save_torch({"kind": "ebm", "width": 2, "image_size": 8, "channels": 3, "state_dict": ebm.state_dict()}, url)
    assert load_ebm(url, activation="lrelu").activation_spec() == {"name": "lrelu", "slope": 0.05}
    committed = load_ebm("models/ebm-cifar10-cpu/ebm.pt", activation="lrelu")
    assert committed.activation == "lrelu"


def test_activation_mismatch_fails_in_one_line_naming_both(tmp_path):
    url = str(tmp_path / "soft.pt")
    save_ebm(EBM(width=2, image_size=8, activation="soft_lrelu"), url)
    with pytest.raises(InputError) as err:
        load_ebm(url, activation="lrelu")
    assert str(err.value) == (f"EBM checkpoint {url} has activation soft_lrelu (alpha=0.49, eps=0.01), "
                              "the config asks for lrelu (slope=0.05)")
    with pytest.raises(InputError, match=r"has activation soft_lrelu \(alpha=0.49, eps=0.01\), the config asks for "
                                         r"soft_lrelu \(alpha=0.49, eps=0.02\)"):
        load_ebm(url, activation="soft_lrelu", soft_eps=0.02)
    # through an attack config: the pre-flight load fails before any work
    cfg = build(AttackConfig, {"ebm": url, "ebm_net": {"activation": "silu"}, "data": {"image_size": 8},
                               "classifier": {"weights": RESNET20}})
    with pytest.raises(InputError, match="has activation soft_lrelu .*the config asks for silu$"):
        build_attack(cfg)
    cfg.ebm_net.activation = None  # null: whatever the checkpoint holds
    assert build_attack(cfg).defense.purifier.ebm.activation == "soft_lrelu"
