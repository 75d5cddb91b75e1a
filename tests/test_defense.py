import pytest
import torch
import torch.nn.functional as F

from distributed_ebm.method.defense import EOTDefense, Purifier
from distributed_ebm.method.noise import ChainKeys

from .conftest import tiny_ebm


@pytest.fixture(scope="module")
def setup(exact_test, resnet20):
    purifier = Purifier(tiny_ebm(scale=20), steps=3, step_size=1.0, noise=0.05)
    return resnet20, purifier, exact_test.floats()[:3], exact_test.labels[:3], exact_test.ids[:3]


def test_bpda_gradient_is_the_classifier_gradient_at_the_purified_point(setup):
    clf, purifier, x, y, ids = setup
    logits, grad = EOTDefense(clf, purifier).logits_and_grad(x, y, ids, seed=4, call=7, replicates=1)
    xp = purifier(x, ChainKeys.replicated(4, ids, 1, call=7)).requires_grad_(True)
    ref_logits = clf(xp)
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(ref_logits, y, reduction="sum"), xp)
    assert torch.allclose(logits, ref_logits.detach(), atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("average", ["logits", "softmax"])
def test_eot_average_and_its_gradient_match_one_autograd_graph(setup, average):
    clf, purifier, x, y, ids = setup
    h = 4
    logits, grad = EOTDefense(clf, purifier, average=average).logits_and_grad(x, y, ids, seed=1, call=2, replicates=h)
    xp = purifier(x.repeat_interleave(h, 0), ChainKeys.replicated(1, ids, h, call=2)).requires_grad_(True)
    z = clf(xp).view(len(x), h, -1)
    agg = z.mean(1) if average == "logits" else z.softmax(-1).mean(1).log()
    (g,) = torch.autograd.grad(F.cross_entropy(agg, y, reduction="sum"), xp)
    assert torch.allclose(logits, agg.detach(), atol=1e-5)
    assert torch.allclose(grad, g.view(len(x), h, *x.shape[1:]).sum(1), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("average", ["logits", "softmax"])
def test_chunked_replicates_equal_one_big_batch(setup, average):
    clf, purifier, x, y, ids = setup
    big = EOTDefense(clf, purifier, chunk_size=10_000, average=average)
    small = EOTDefense(clf, purifier, chunk_size=3, average=average)
    for d in (big, small):
        d.out = d.logits_and_grad(x, y, ids, seed=0, call=0, replicates=5)
    assert torch.allclose(big.out[0], small.out[0], atol=1e-5)
    assert torch.allclose(big.out[1], small.out[1], atol=2e-5, rtol=1e-4)  # conv kernels differ by batch size at 1e-7
    assert torch.allclose(big.logits(x, ids, seed=0, call=1, replicates=7),
                          small.logits(x, ids, seed=0, call=1, replicates=7), atol=1e-5)
    # one image alone gets the same answer as inside the batch
    alone = small.logits(x[1:2], ids[1:2], seed=0, call=1, replicates=7)
    assert torch.allclose(alone, big.logits(x, ids, seed=0, call=1, replicates=7)[1:2], atol=1e-5)


def test_purifier_starts_at_the_input_and_moves(setup):
    _, purifier, x, _, ids = setup
    keys = ChainKeys.replicated(0, ids, 1)
    assert not torch.equal(purifier(x, keys), x)
    assert Purifier(None, steps=0).is_identity and Purifier(tiny_ebm(), steps=0)(x, keys).equal(x)
    assert Purifier(None, steps=10, noise=0.0).is_identity


class _Pixels(torch.nn.Module):
    """A 'classifier' whose outputs are elementwise in its input (no batch-size-dependent kernels),
    so any difference between chunkings can only come from the reduction over replicates."""

    def forward(self, x):
        return x.flatten(1)[:, :10] * 3.0 + torch.arange(10.0) / 10


def _sequential_index_add(out: torch.Tensor, replicates: int) -> torch.Tensor:
    """The previous reduction: one `index_add_` of every chain's output into its image's sum."""
    owner = torch.arange(out.shape[0]) // replicates
    return torch.zeros(out.shape[0] // replicates, *out.shape[1:]).index_add_(0, owner, out) / replicates


@pytest.mark.parametrize("average", ["logits", "softmax"])
def test_replicate_sums_are_fixed_order_whatever_the_chunking(exact_test, average):
    x, ids, y = exact_test.floats()[:3], exact_test.ids[:3], exact_test.labels[:3]
    purifier, r = Purifier(None, steps=2, step_size=0.0, noise=0.3), 7
    chains = purifier(x.repeat_interleave(r, 0), ChainKeys.replicated(5, ids, r, call=1))
    out = _Pixels()(chains)
    expected = _sequential_index_add(out if average == "logits" else out.softmax(1), r)
    expected = expected if average == "logits" else expected.log()
    for chunk in (1, 2, 3, 5, 7, 8, 20, 1000):
        d = EOTDefense(_Pixels(), purifier, chunk_size=chunk, average=average)
        assert torch.equal(d.logits(x, ids, seed=5, call=1, replicates=r), expected), chunk
        logits, grad = d.logits_and_grad(x, y, ids, seed=5, call=1, replicates=r)
        if chunk == 1:
            first = grad
        assert torch.equal(logits, expected) and torch.equal(grad, first), chunk


def test_no_reduction_that_is_nondeterministic_on_cuda(setup):
    """index_add_ / scatter_add_ / accumulating index_put_ use atomics on CUDA (run-to-run noise)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            accumulate = (func.__name__.startswith("index_put")
                          and (kwargs.get("accumulate") or (len(args) > 3 and args[3])))
            if func.__name__.split(".")[0] in ("index_add", "index_add_", "scatter_add", "scatter_add_") or accumulate:
                self.seen.add(func.__name__)
            return func(*args, **kwargs)

    clf, purifier, x, y, ids = setup
    d = EOTDefense(clf, Purifier(purifier.ebm, steps=2, step_size=1.0, noise=0.05), chunk_size=4)
    with Ops() as ops:
        d.logits(x, ids, seed=0, call=0, replicates=3)
        d.logits_and_grad(x, y, ids, seed=0, call=0, replicates=3)
        d.logits_and_grad(x, y, ids, seed=0, call=0, replicates=3, exact=True, segment=1)
    assert not ops.seen


def test_memory_is_bounded_by_chunk_size_not_replicates(exact_test):
    from distributed_ebm.method.memory import peak_allocated_bytes

    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 32 * 32, 10))
    x, ids, y = exact_test.floats()[:2], exact_test.ids[:2], exact_test.labels[:2]
    d = EOTDefense(clf, Purifier(tiny_ebm(width=4), steps=2, step_size=1.0, noise=0.05), chunk_size=4)
    image = x[0].numel() * x.element_size()

    def peak(replicates, **kw):
        work = (lambda: d.logits(x, ids, seed=0, call=0, replicates=replicates)) if kw.pop("logits", False) else \
            (lambda: d.logits_and_grad(x, y, ids, seed=0, call=0, replicates=replicates, **kw))
        return peak_allocated_bytes(work)

    few, many = 4, 40  # 36 more chains per image: 72 more images' worth if they were kept
    assert peak(many, logits=True) - peak(few, logits=True) < 4 * image
    assert peak(many, exact=True) - peak(few, exact=True) < 4 * image
    # BPDA keeps its purified images between its two passes, and nothing more
    grows = peak(many) - peak(few)
    assert 2 * (many - few) * image <= grows < 2 * (many - few) * image + 4 * image
