import pytest
import torch

from distributed_ebm.method.noise import CALL_RANDOM_START, ChainKeys, philox4x32


def _w(v):
    return torch.tensor([v], dtype=torch.int64)


def test_philox_known_answers():
    # Random123 tests/kat_vectors, "philox4x32 10" lines: counter, key -> output.
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for counter, key, expected in cases:
        out = philox4x32([_w(c) for c in counter], [_w(k) for k in key])
        assert [int(o) for o in out] == expected


def test_normal_moments_and_independence():
    keys = ChainKeys.replicated(7, torch.arange(400), 5)
    z = keys.normal(3, (3, 32, 32)).flatten(1)
    assert abs(z.mean().item()) < 0.003
    assert abs(z.std().item() - 1) < 0.003
    # different chains and different steps are uncorrelated
    assert abs(torch.corrcoef(torch.stack([z[0], z[1]]))[0, 1].item()) < 0.08
    z2 = keys.normal(4, (3, 32, 32)).flatten(1)
    assert abs((z * z2).mean().item()) < 0.003
    u = keys.uniform(0, (100,))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_a_chains_noise_does_not_depend_on_its_batch():
    batch = ChainKeys.replicated(1, torch.tensor([5, 9, 11]), 4, call=2)
    alone = ChainKeys.replicated(1, torch.tensor([9]), 4, call=2)
    assert torch.equal(batch.normal(10, (3, 4, 4))[4:8], alone.normal(10, (3, 4, 4)))
    assert torch.equal(batch[2:6].normal(10, (3, 4, 4)), batch.normal(10, (3, 4, 4))[2:6])
    # the key's parts all matter
    base = alone.normal(10, (3, 4, 4))
    for other in (ChainKeys.replicated(2, torch.tensor([9]), 4, call=2), alone.with_call(3)):
        assert not torch.equal(other.normal(10, (3, 4, 4)), base)
    assert not torch.equal(alone.normal(11, (3, 4, 4)), base)


def test_chain_words_known_answers():
    # Recorded from noise.py before the fast path. The integer words are the same on every machine and
    # must never change, bit for bit. The normals are float32 log/sqrt/cos/sin of them, whose last bit
    # depends on the CPU's vector math (AVX2 and AVX-512 kernels differ by an ulp): pinned to float32 rounding.
    k = ChainKeys.replicated(2021, torch.tensor([3, 4000000000]), 2, call=9)
    w = k._words(77, 8, None)
    assert [[int(x) for x in ww[:, 1]] for ww in w] == [
        [0xbb1c7312, 0x2af00bf2, 0xcafafa89, 0x60371360], [0xa260fbfd, 0xd173d650, 0xc915eaae, 0x8c60c3da],
        [0x60a9d754, 0x9faced20, 0x924382aa, 0xd7e3e8f8], [0xbf6e35cf, 0x1afe567d, 0x402fab21, 0x6c759947]]
    expected = [-1.690126657485962, 0.7928726077079773, -1.2198169231414795, -0.0016072177095338702,
                -1.3349276781082153]
    got = k.normal(77, (5,))[3]
    assert got.dtype == torch.float32
    close = dict(rtol=4 * 2.0**-23, atol=1e-7)  # a few float32 ulps
    torch.testing.assert_close(got, torch.tensor(expected), **close)
    # what an AMD EPYC with AVX-512 kernels gives for the third (one ulp off) passes too
    torch.testing.assert_close(torch.tensor(-1.21981680393219), torch.tensor(expected[2]), **close)


def test_device_resident_keys_and_counters_give_identical_words():
    keys = ChainKeys.replicated(2**32 - 1, torch.tensor([0, 5, 2**32 - 1]), 2, call=CALL_RANDOM_START)
    per_row_call = ChainKeys(keys.seed, keys.ids, keys.replicas, torch.full((6,), CALL_RANDOM_START))
    for step in (0, 9, 2**32 - 1):
        ref = keys._words(step, 50, None)
        for k, s in ((keys.to("cpu"), torch.tensor(step)), (per_row_call, step), (per_row_call, torch.tensor(step))):
            assert all(torch.equal(a, b) for a, b in zip(ref, k._words(s, 50, None)))
            assert torch.equal(keys.normal(step, (50,)), k.normal(s, (50,)))


_TRITON_CHECK = """
import pytest
import torch
from distributed_ebm.method.noise import ChainKeys
from distributed_ebm.method import philox_triton as pt
worst = 0.0
for seed, call in [(0, 0), (2**32 - 1, 0x7FFF0001), (2021, torch.arange(6) * 7919)]:
    k = ChainKeys.replicated(seed, torch.tensor([3, 2**32 - 1, 7]), 2, call)
    for step, numel in [(0, 10), (77, 3072), (torch.tensor(2**32 - 1), 13)]:
        assert all(torch.equal(a, b) for a, b in zip(k._words(step, numel, None), pt.words(k, step, numel)))
        worst = max(worst, (k.normal_reference(step, (numel,)) - pt.normal(k, step, (numel,))).abs().max().item())
print("max_abs_diff", worst)
"""


def test_fused_triton_kernel_matches_noise_py_in_the_interpreter():
    # TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter.
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) <= 1e-5  # the words are equal bit for bit (asserted inside)


@pytest.mark.gpu
def test_fused_kernel_on_cuda_matches_the_cpu():
    keys = ChainKeys.replicated(7, torch.arange(300), 5, call=11)
    cuda_keys = keys.to("cuda")
    from distributed_ebm.method import philox_triton as pt

    ref = keys._words(3, 3072, None)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(ref, pt.words(cuda_keys, 3, 3072)))
    z = cuda_keys.normal(torch.tensor(3, device="cuda"), (32, 32, 3))
    assert (z.cpu() - keys.normal(3, (32, 32, 3))).abs().max() <= 1e-5
