"""Exact gradients through the Langevin chain: checkpointed = unrolled autograd = finite differences."""
import pytest
import torch
import torch.nn.functional as F

from distributed_ebm.method.exact_chain import differentiable_langevin
from distributed_ebm.method.langevin import langevin
from distributed_ebm.method.nets import EBM
from distributed_ebm.method.noise import ChainKeys


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


def _unrolled(ebm, x, keys, steps, s=1.0, sigma=0.01):
    """The chain written plainly, one autograd graph through every step (the reference)."""
    n, c, h, w = x.shape
    for t in range(steps):
        (g,) = torch.autograd.grad(ebm(x).sum(), x, create_graph=True)
        x = x - s * g + sigma * keys.normal(t, (h, w, c), dtype=x.dtype).permute(0, 3, 1, 2)
    return x


def test_forward_is_the_purifier(setup):
    ebm, x, keys, _ = setup
    assert torch.allclose(differentiable_langevin(ebm, x, keys, 5, segment=2).detach(), langevin(ebm, x, keys, 5),
                          atol=1e-12)


def test_checkpointed_gradient_equals_unrolled_autograd_and_finite_differences(setup):
    ebm, x, keys, loss = setup
    xr = x.clone().requires_grad_(True)
    (unrolled,) = torch.autograd.grad(loss(_unrolled(ebm, xr, keys, 5)), xr)
    for segment in (1, 2, 3, 5):
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


@pytest.mark.parametrize("average", ["logits", "softmax"])
def test_exact_eot_gradient_equals_autograd_through_every_replicate(setup, average):
    """The defense's exact gradient (chunked, checkpointed) = one autograd graph through all
    replicate chains and the averaged loss; BPDA's is different for a smooth EBM."""
    from distributed_ebm.method.defense import EOTDefense, Purifier
    ebm, x, keys, _ = setup
    torch.manual_seed(2)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)).double()
    y, ids, h, steps = torch.tensor([1, 3]), torch.tensor([4, 7]), 3, 4
    defense = EOTDefense(clf, Purifier(ebm, steps, 1.0, 0.01), chunk_size=4, average=average)
    logits, exact = defense.logits_and_grad(x, y, ids, seed=9, call=5, replicates=h, exact=True, segment=2)
    _, bpda = defense.logits_and_grad(x, y, ids, seed=9, call=5, replicates=h)

    xr = x.clone().requires_grad_(True)
    chains = differentiable_langevin(ebm, xr.repeat_interleave(h, 0), ChainKeys.replicated(9, ids, h, 5), steps,
                                     1.0, 0.01, segment=steps)
    z = clf(chains).view(2, h, -1)
    agg = z.mean(1) if average == "logits" else z.softmax(-1).mean(1).log()
    (ref,) = torch.autograd.grad(F.cross_entropy(agg, y, reduction="sum"), xr)
    assert torch.allclose(logits, agg.detach(), atol=1e-12)
    assert torch.allclose(exact, ref, atol=1e-12, rtol=1e-9)
    assert not torch.allclose(bpda, ref, rtol=1e-3)


def test_checkpointed_memory_grows_with_sqrt_steps_and_segment_not_with_steps():
    """Allocator peaks (CPU: PyTorch's allocator books through the profiler) of one exact gradient."""
    from distributed_ebm.method.memory import peak_allocated_bytes
    torch.manual_seed(0)
    ebm = EBM(width=4)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    keys = ChainKeys.replicated(0, torch.arange(4), 1)

    def peak(steps, segment):
        def work():
            xr = x.clone().requires_grad_(True)
            differentiable_langevin(ebm, xr, keys, steps, segment=segment).sum().backward()
        return peak_allocated_bytes(work)

    k16, k64, k256 = peak(16, 4), peak(64, 8), peak(256, 16)  # segment = sqrt(K)
    assert k64 < 2.6 * k16 and k256 < 2.6 * k64, (k16, k64, k256)  # sqrt(4) = 2 per 4x steps
    assert peak(64, 64) > 3 * k64  # the unrolled chain grows with K
    assert peak(64, 4) < peak(64, 16)  # one segment's graph outweighs the stored states


@pytest.mark.parametrize("steps", [150, pytest.param(1500, marks=pytest.mark.slow)], ids=["K150", "K1500"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["float32", "bf16"])
def test_the_recomputed_chain_is_the_judged_chain_bit_for_bit(amp, steps):
    """In float32 (and with the EBM under bf16 autocast): the states the gradient is taken through are the
    sampler's own, bit for bit (the backward compares every recomputed segment with them and would raise
    ChainMismatch). At the paper's K = 1500 (full suite, `slow`) and at K = 150 (12 segments, the inner loop). A
    recomputation by another formula (eager NCHW, x - s g + sigma xi) ends close, not equal, and fails here."""
    from distributed_ebm.method.exact_chain import ChainMismatch  # noqa: F401  (what a difference would raise
    from distributed_ebm.method.langevin import prepare_energy

    from .conftest import tiny_ebm
    ebm = prepare_energy(tiny_ebm(width=4, scale=20).eval())
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    keys = ChainKeys.replicated(0, torch.tensor([3, 9]), 1, call=2)
    xr = x.clone().requires_grad_(True)
    out = differentiable_langevin(ebm, xr, keys, steps, amp=amp)
    assert torch.equal(out.detach(), langevin(ebm, x, keys, steps, amp=amp))
    (g,) = torch.autograd.grad(out.sum(), xr)  # recomputes every segment (39 at K = 1500), each compared bit for bit
    assert torch.isfinite(g).all()


def test_a_recomputation_that_leaves_the_judged_chain_fails_in_one_line():
    """Kernels that do not repeat (here an energy that changes between calls) cannot give the judged chain's
    gradient: the backward refuses, naming the segment."""
    from distributed_ebm.method.exact_chain import ChainMismatch

    class Drifting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.calls = torch.nn.Parameter(torch.tensor(1.0)), 0

        def forward(self, x):
            self.calls += 1
            return (self.w + 1e-3 * self.calls) * (x ** 2).flatten(1).sum(1)

    x = torch.zeros(1, 3, 8, 8).requires_grad_(True)
    out = differentiable_langevin(Drifting(), x, ChainKeys.replicated(0, torch.tensor([1]), 1), 4, 0.1, 0.01, 2)
    with pytest.raises(ChainMismatch, match=r"recomputed chain left the judged one in steps 2\.\.3"):
        out.sum().backward()


def test_a_differentiated_chain_that_is_not_the_judged_one_fails_in_one_line(setup):
    """The chain the defense judged (its first pass) and the chain the gradient goes through (the second) must be one
    chain: a purifier whose judged pass differs in the last bit (as TF32 or a non-deterministic kernel would make it)
    fails the exact gradient instead of differentiating the other chain."""
    from distributed_ebm.method.defense import EOTDefense, Purifier
    from distributed_ebm.method.exact_chain import ChainMismatch, chain_digest
    ebm, x, keys, _ = setup
    out = langevin(ebm, x, keys, 4)
    assert torch.equal(differentiable_langevin(ebm, x, keys, 4, segment=2, judged=chain_digest(out)).detach(), out)
    one_value_off = out.clone()
    one_value_off[1, 2, 3, 4] = one_value_off[1, 2, 3, 4].nextafter(one_value_off[1, 2, 3, 4] + 1)
    with pytest.raises(ChainMismatch, match=r"differentiated chain is not the judged one after 4 steps \(1 of 2"):
        differentiable_langevin(ebm, x, keys, 4, segment=2, judged=chain_digest(one_value_off))

    class OffByOneBit(Purifier):  # the judged pass: the sampler's chain, one ulp off
        def __call__(self, x, keys):
            out = super().__call__(x, keys)
            return out.nextafter(out + 1)

    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)).double()
    y, ids = torch.tensor([1, 3]), torch.tensor([4, 7])
    kw = dict(seed=9, call=5, replicates=2, exact=True, segment=2)
    EOTDefense(clf, Purifier(ebm, 4, 1.0, 0.01), chunk_size=3).logits_and_grad(x, y, ids, **kw)  # the same chain: fine
    with pytest.raises(ChainMismatch, match="differentiated chain is not the judged one"):
        EOTDefense(clf, OffByOneBit(ebm, 4, 1.0, 0.01), chunk_size=3).logits_and_grad(x, y, ids, **kw)
