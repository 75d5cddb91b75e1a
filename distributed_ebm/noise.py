"""Counter-based random numbers keyed by chain, so a chain's noise never depends on its batch.

Every Langevin chain is named by a key (run seed, image id, call, replicate). Its noise at step t
is Philox4x32-10 (Salmon et al., SC 2011; the generator behind torch's CUDA RNG) applied to the
counter (element block, t, call, replicate) under the key (image id, seed). The same chain
therefore draws the same noise whether it runs alone, in a chunk of replicates, in another
batch, on another worker, or on another device. Arithmetic is done on int64 tensors holding
32-bit words, which works on any torch device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10

# Reserved "call" numbers for draws that are not Langevin steps of an attack point.
CALL_RANDOM_START = 0x7FFF0001


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor]) -> list[torch.Tensor]:
    """Philox4x32-10 on broadcastable int64 tensors holding uint32 words; returns 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(_ROUNDS):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = c0 * _M0  # < 2**64: wraps in int64 but keeps all 64 bits
        p1 = c2 * _M1
        hi0, lo0 = (p0 >> 32) & _MASK32, p0 & _MASK32
        hi1, lo1 = (p1 >> 32) & _MASK32, p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


@dataclass(frozen=True)
class ChainKeys:
    """Keys of a batch of chains: one row per chain.

    seed: run seed; ids: image (or bank slot) id per chain; replicas: replicate number per chain;
    call: which draw this is for the image (an attack point, a training iteration, ...).
    """

    seed: int
    ids: torch.Tensor
    replicas: torch.Tensor
    call: int | torch.Tensor = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    @staticmethod
    def replicated(seed: int, ids: torch.Tensor, replicates: int, call: int = 0) -> "ChainKeys":
        """Keys for `replicates` chains per id, laid out id-major (as `repeat_interleave`)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        reps = torch.arange(replicates, dtype=torch.int64).repeat(ids.shape[0])
        return ChainKeys(seed, ids.repeat_interleave(replicates), reps, call)

    def __getitem__(self, rows) -> "ChainKeys":
        call = self.call[rows] if isinstance(self.call, torch.Tensor) else self.call
        return ChainKeys(self.seed, self.ids[rows], self.replicas[rows], call)

    def with_call(self, call: int) -> "ChainKeys":
        return ChainKeys(self.seed, self.ids, self.replicas, call)

    def _words(self, step: int, numel: int, device) -> list[torch.Tensor]:
        n_blocks = (numel + 3) // 4
        col = lambda t: torch.as_tensor(t, dtype=torch.int64, device=device).reshape(-1, 1)  # noqa: E731
        blocks = torch.arange(n_blocks, dtype=torch.int64, device=device).reshape(1, -1)
        counter = [blocks, col(step & _MASK32), col(self.call) & _MASK32, col(self.replicas) & _MASK32]
        key = [col(self.ids) & _MASK32, col(self.seed & _MASK32)]
        return philox4x32(counter, key)

    def uniform(self, step: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """U(0, 1) draws (open interval), shape (len(self), *shape)."""
        numel = math.prod(shape)
        words = self._words(step, numel, device)
        u = torch.stack(words, dim=-1).reshape(len(self), -1)[:, :numel]
        # 24 high bits + 0.5: strictly inside (0, 1), exact in float32.
        u = ((u >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
        return u.reshape(len(self), *shape).to(dtype)

    def normal(self, step: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) draws by Box-Muller, shape (len(self), *shape)."""
        numel = math.prod(shape)
        w0, w1, w2, w3 = self._words(step, numel, device)
        to_unit = lambda w: ((w >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)  # noqa: E731
        r0 = torch.sqrt(-2.0 * torch.log(to_unit(w0)))
        r1 = torch.sqrt(-2.0 * torch.log(to_unit(w2)))
        t0 = (2.0 * math.pi) * to_unit(w1)
        t1 = (2.0 * math.pi) * to_unit(w3)
        z = torch.stack([r0 * torch.cos(t0), r0 * torch.sin(t0), r1 * torch.cos(t1), r1 * torch.sin(t1)], -1)
        return z.reshape(len(self), -1)[:, :numel].reshape(len(self), *shape).to(dtype)
