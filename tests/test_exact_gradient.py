"""Exact gradients through the Langevin chain: checkpointed = unrolled autograd = finite differences."""
import pytest
import torch
import torch.nn.functional as F

from distributed_ebm.exact_chain import differentiable_langevin
from distributed_ebm.langevin import langevin
from distributed_ebm.nets import EBM
from distributed_ebm.noise import ChainKeys


class SmoothEnergy(torch.nn.Module):
    """A small EBM with a smooth activation, so the chain's Hessian terms are not zero."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 4, 0), torch.nn.Softplus(beta=4),
                                       torch.nn.Conv2d(4, 1, 8, 1, 0))

    def forward(self, x):
        return 5 * self.net(x).flatten()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ebm = SmoothEnergy().double()
    x = (torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1) * 0.5
    keys = ChainKeys.replicated(1, torch.tensor([4, 7]), 1, call=3)
    head = torch.randn(2, 3 * 32 * 32, dtype=torch.float64)
    loss = lambda z: (z.flatten(1) * head).sum() + (z ** 2).sum()  # noqa: E731
    return ebm, x, keys, loss


def _grad(ebm, x, keys, loss, segment, steps=5):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(differentiable_langevin(ebm, x, keys, steps, 1.0, 0.01, segment)), x)
    return g


def test_forward_is_the_purifier(setup):
    ebm, x, keys, _ = setup
    assert torch.allclose(differentiable_langevin(ebm, x, keys, 5, segment=2).detach(), langevin(ebm, x, keys, 5),
                          atol=1e-12)


def test_checkpointed_gradient_equals_unrolled_autograd_and_finite_differences(setup):
    ebm, x, keys, loss = setup
    unrolled = _grad(ebm, x, keys, loss, segment=5)
    for segment in (1, 2, 3):
        assert torch.allclose(_grad(ebm, x, keys, loss, segment), unrolled, atol=1e-10, rtol=1e-8)
    # finite differences along random directions
    torch.manual_seed(1)
    for _ in range(3):
        v = torch.randn_like(x)
        h = 1e-5
        plus = loss(langevin(ebm, x + h * v, keys, 5))
        minus = loss(langevin(ebm, x - h * v, keys, 5))
        assert ((plus - minus) / (2 * h)).item() == pytest.approx((unrolled * v).sum().item(), rel=1e-6)
    # and the Hessian terms matter: the identity (BPDA) gradient is different
    z = langevin(ebm, x, keys, 5).requires_grad_(True)
    (bpda,) = torch.autograd.grad(loss(z), z)
    assert not torch.allclose(bpda, unrolled, rtol=1e-3)


def test_the_papers_piecewise_linear_ebm_has_an_identity_chain_jacobian():
    """LeakyReLU makes f piecewise linear, so its Hessian is zero almost everywhere: the exact
    pathwise gradient through the chain is the identity, i.e. BPDA's, except at the kinks."""
    torch.manual_seed(0)
    ebm = EBM(width=2).double()
    x = (torch.rand(2, 3, 32, 32, dtype=torch.float64) - 0.5).requires_grad_(True)
    keys = ChainKeys.replicated(0, torch.tensor([0, 1]), 1)
    (g,) = torch.autograd.grad(differentiable_langevin(ebm, x, keys, 5, segment=2).sum(), x)
    assert torch.equal(g, torch.ones_like(g))


def test_no_gradient_reaches_the_ebm(setup):
    ebm, x, keys, _ = setup
    out = differentiable_langevin(ebm, x.clone().requires_grad_(True), keys, 4, segment=2)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    assert all(p.grad is None and p.requires_grad for p in ebm.parameters())
