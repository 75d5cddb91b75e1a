import torch

from distributed_ebm.noise import ChainKeys, philox4x32


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
