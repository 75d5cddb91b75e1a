import pytest
import torch
import torch.nn.functional as F

from distributed_ebm.defense import EOTDefense, Purifier
from distributed_ebm.noise import ChainKeys

from .conftest import tiny_ebm


@pytest.fixture(scope="module")
def setup(exact_test, resnet20):
    purifier = Purifier(tiny_ebm(scale=20), steps=3, step_size=1.0, noise=0.05)
    return resnet20, purifier, exact_test.images[:3], exact_test.labels[:3], exact_test.ids[:3]


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
