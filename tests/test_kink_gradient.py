"""Kink-aware exact gradients (attack.surrogate): the forward chain is the exact one, each step is
differentiated through a smooth stand-in f_T of the LeakyReLU EBM. Float64, tiny sizes.

What finite differences can check: only the *smoothed* chain (drift grad f_T everywhere) has a
gradient that finite differences see, and differentiating it through f_T is then plain exact_eot on a
smooth EBM; the hybrid (exact states, Hess f_T) is no chain's gradient, so it is checked against its
definition, J_0^T ... J_{K-1}^T grad L(x_K) with J_t = I - s Hess f_T(x_t) at the exact states x_t.
"""
import pytest
import torch

from distributed_ebm.config import AttackSettings, build
from distributed_ebm.errors import ConfigError
from distributed_ebm.method.defense import EOTDefense, Purifier
from distributed_ebm.method.exact_chain import differentiable_langevin
from distributed_ebm.method.langevin import langevin
from distributed_ebm.method.nets import EBM
from distributed_ebm.method.noise import ChainKeys

STEPS, S, SIGMA = 4, 1.0, 0.01


def _ebm(activation="lrelu", seed=0):
    torch.manual_seed(seed)
    ebm = EBM(width=2, image_size=8, activation=activation).double()
    with torch.no_grad():
        ebm.net[-1].weight.mul_(30)  # gradients that move the chain at s = 1
    return ebm


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    x = (torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1) * 0.8
    keys = ChainKeys.replicated(3, torch.tensor([5, 9]), 1, call=1)
    head = torch.randn(2, 3 * 8 * 8, dtype=torch.float64)
    loss = lambda z: (z.flatten(1) * head).sum() + (z ** 3).sum()  # noqa: E731
    return x, keys, loss


def _grad(energy, x, keys, loss, segment=2, surrogate=None):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(differentiable_langevin(energy, xr, keys, STEPS, S, SIGMA, segment, surrogate)), xr)
    return g


def _pathwise(ebm, x, keys, loss):
    """BPDA = the pathwise gradient of a piecewise-linear EBM: grad L at the purified image."""
    z = langevin(ebm, x, keys, STEPS, S, SIGMA).requires_grad_(True)
    return torch.autograd.grad(loss(z), z)[0]


def test_smoothed_chain_gradient_equals_finite_differences(setup):
    x, keys, loss = setup
    smooth = _ebm().smooth_surrogate(0.05)
    g = _grad(smooth, x, keys, loss)
    torch.manual_seed(2)
    for _ in range(3):
        v, h = torch.randn_like(x), 1e-5
        fd = (loss(langevin(smooth, x + h * v, keys, STEPS, S, SIGMA)) -
              loss(langevin(smooth, x - h * v, keys, STEPS, S, SIGMA))) / (2 * h)
        assert fd.item() == pytest.approx((g * v).sum().item(), rel=1e-6)
    # and its forward+backward through the surrogate option is the same thing
    assert torch.allclose(_grad(smooth, x, keys, loss, surrogate=smooth), g, atol=1e-12)


def test_hybrid_is_the_mixed_quantity_at_the_exact_states(setup):
    x, keys, loss = setup
    ebm = _ebm()
    smooth = ebm.smooth_surrogate(0.05)
    states = [x]
    for t in range(STEPS):
        states.append(langevin(ebm, states[-1], keys, 1, S, SIGMA, start_step=t))
    z = states[-1].clone().requires_grad_(True)
    (v,) = torch.autograd.grad(loss(z), z)
    for xt in reversed(states[:-1]):  # v <- (I - s Hess f_T(x_t)) v
        xt = xt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(smooth(xt).sum(), xt, create_graph=True)
        v = v - S * torch.autograd.grad(g, xt, v)[0]
    for segment in (1, 2, STEPS):
        assert torch.allclose(_grad(ebm, x, keys, loss, segment, smooth), v, atol=1e-10, rtol=1e-8)
    # the forward value is the exact chain's
    out = differentiable_langevin(ebm, x.clone().requires_grad_(True), keys, STEPS, S, SIGMA, STEPS, smooth)
    assert torch.allclose(out.detach(), states[-1], atol=1e-13)
    plain = differentiable_langevin(ebm, x.clone().requires_grad_(True), keys, STEPS, S, SIGMA, STEPS)
    assert torch.equal(out.detach(), plain.detach())  # bit for bit: the added term is exactly zero
    # and it is not the smoothed chain's gradient (whose states differ) nor BPDA's
    assert not torch.allclose(v, _grad(smooth, x, keys, loss), rtol=1e-3)
    assert not torch.allclose(v, _pathwise(ebm, x, keys, loss), rtol=1e-2)


def test_hybrid_tends_to_the_pathwise_gradient_as_t_goes_to_zero(setup):
    """Not monotonically: Hess f_T is a bump of height ~1/T and width ~T at each kink, so the
    difference is carried by the units within ~T of their kink; it grows while T shrinks towards
    the distance of the nearest one (here ~1e-5) and vanishes once T is below it."""
    x, keys, loss = setup
    ebm = _ebm()
    pathwise = _pathwise(ebm, x, keys, loss)
    assert torch.allclose(_grad(ebm, x, keys, loss), pathwise, atol=1e-10)  # exact_eot = BPDA on LeakyReLU
    errors = {t: ((_grad(ebm, x, keys, loss, 2, ebm.smooth_surrogate(t)) - pathwise).norm() / pathwise.norm()).item()
              for t in (1e-2, 1e-4, 1e-7, 1e-8)}
    assert errors[1e-2] > 0.02 and errors[1e-4] > 0.1, errors
    assert errors[1e-7] < 1e-12 and errors[1e-8] < 1e-12, errors


@pytest.mark.parametrize("activation", ["soft_lrelu", "silu"])
def test_the_option_changes_nothing_on_a_smooth_ebm(setup, activation):
    """The rule: the surrogate replaces piecewise-linear activations only; smooth ones have their own Hessian."""
    x, keys, _ = setup
    ebm = _ebm(activation)
    assert ebm.smooth_surrogate(0.05) is None
    torch.manual_seed(3)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).double()
    d = EOTDefense(clf, Purifier(ebm, STEPS, S, SIGMA), chunk_size=3)
    y, ids = torch.tensor([1, 4]), torch.tensor([5, 9])
    kw = dict(seed=0, call=2, replicates=2, exact=True, segment=2)
    _, plain = d.logits_and_grad(x, y, ids, **kw)
    _, kinked = d.logits_and_grad(x, y, ids, **kw, surrogate_temperature=0.05)
    _, bpda = d.logits_and_grad(x, y, ids, seed=0, call=2, replicates=2)
    assert torch.equal(plain, kinked) and not torch.allclose(plain, bpda, rtol=1e-3)


def test_defense_kink_aware_gradient_differs_from_bpda_on_lrelu(setup):
    x, _, _ = setup
    ebm = _ebm()
    torch.manual_seed(3)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).double()
    d = EOTDefense(clf, Purifier(ebm, STEPS, S, SIGMA), chunk_size=3)
    y, ids = torch.tensor([1, 4]), torch.tensor([5, 9])
    kw = dict(seed=0, call=2, replicates=2)
    _, bpda = d.logits_and_grad(x, y, ids, **kw)
    _, exact = d.logits_and_grad(x, y, ids, **kw, exact=True)
    _, kinked = d.logits_and_grad(x, y, ids, **kw, exact=True, surrogate_temperature=0.05)
    assert torch.allclose(exact, bpda, atol=1e-10) and not torch.allclose(kinked, bpda, rtol=1e-2)


def test_surrogate_needs_exact_eot():
    with pytest.raises(ConfigError, match="attack.surrogate .* needs attack.mode=exact_eot"):
        build(AttackSettings, {"mode": "bpda_eot", "surrogate": "softplus"})
    assert build(AttackSettings, {"mode": "exact_eot", "surrogate": "softplus",
                                  "surrogate_temperature": 0.1}).surrogate_temperature == 0.1


def test_the_attack_engine_runs_the_kink_aware_gradient(setup):
    from distributed_ebm.method.attacks import Attack
    x, _, _ = setup
    torch.manual_seed(3)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).double()
    y, ids = clf(x).argmax(1), torch.tensor([5, 9])  # correct at first: the attack gets to take steps
    settings = dict(mode="exact_eot", steps=2, eot_attack=2, eot_defense=0, eps=0.02, step_size=0.01)
    runs = {}
    for surrogate in (None, "softplus"):
        attack = Attack(clf, Purifier(_ebm(), STEPS, S, SIGMA),
                        build(AttackSettings, {**settings, "surrogate": surrogate}))
        runs[surrogate] = attack(x, y, ids)
    plain, kinked = runs[None], runs["softplus"]
    assert (all(r.natural_protocol_correct for r in plain) and any(r.robust for r in plain)
            and any(r.robust for r in kinked))
    # a gradient costs 3 chain runs (4 kink-aware: the recomputation runs both energies), a check 1
    for records, runs_per_grad in ((plain, 3), (kinked, 4)):
        for r in records:
            if r.robust:  # checks at points 0 and 3, gradients (which also check) at points 1 and 2
                assert r.image_steps == 2 * STEPS * (2 + 2 * runs_per_grad)
    assert any(not (a.adv_image == b.adv_image).all() for a, b in zip(plain, kinked))
