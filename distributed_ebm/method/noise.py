"""Counter-based random numbers keyed by chain, so a chain's noise never depends on its batch.

Every Langevin chain is named by a key (run seed, image id, call, replicate). Its noise at step t
is Philox4x32-10 (Salmon et al., SC 2011; the generator behind torch's CUDA RNG) applied to the
counter (element block, t, call, replicate) under the key (image id, seed). The same chain
therefore draws the same noise whether it runs alone, in a chunk of replicates, in another
batch, on another worker, or on another device. Arithmetic is done on int64 tensors holding
32-bit words, which works on any torch device; on CUDA one fused Triton kernel
(`philox_triton`) computes the same words and normals. Keys and the step counter may live on the
chains' device (`ChainKeys.to`, a 0-d int64 step tensor), so drawing noise copies nothing between
host and device and never synchronises: a captured CUDA graph can replay it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .devices import on_device

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10

# Reserved "call" numbers for draws that are not Langevin steps of an attack point.
CALL_RANDOM_START = 0x7FFF0001
_STREAM_TAG = 0x5354524D  # "STRM": the counter word that marks a derived seed


def philox4x32(counter: list, key: list) -> list:
    """Philox4x32-10 on broadcastable int64 tensors (or Python ints) holding uint32 words; returns 4 words."""
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


def stream_seed(seed: int, *stream: int) -> int:
    """The run seed of key stream `stream` (e.g. (ensemble member, restart)) of a run with `seed`.

    Stream (0, ..., 0) is the run seed itself, so a run with one stream keys exactly as before. Any
    other stream is Philox of the stream numbers under the run seed: a 32-bit seed whose chains,
    random starts and confirmations draw noise independent of every other stream's (a collision with
    another stream or run seed has probability about 2**-32).
    """
    if len(stream) > 2 or any(not 0 <= k <= _MASK32 for k in stream):
        raise ValueError(f"a stream is at most two numbers in [0, 2**32) (got {stream})")
    if not any(stream):
        return seed
    words = list(stream) + [0] * (2 - len(stream))
    return int(philox4x32([words[0], words[1], 0, _STREAM_TAG], [seed & _MASK32, _STREAM_TAG])[0])


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

    def to(self, device) -> "ChainKeys":
        """The same keys with their tensors on `device` (once per chain run, not per step)."""
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return ChainKeys(self.seed, move(self.ids), move(self.replicas), move(self.call))

    def _words(self, step, numel: int, device) -> list[torch.Tensor]:
        """Philox words of counter (block, step, call, replica) under key (id, seed), one row per chain.

        Scalars stay Python ints and tensors already on `device` are used as they are, so a draw on
        device-resident keys creates no host-to-device copy; `step` may be a 0-d device tensor.
        """
        n_blocks = (numel + 3) // 4

        def col(t):
            if not isinstance(t, torch.Tensor):
                return t & _MASK32
            return (t.to(device=device, dtype=torch.int64) & _MASK32).reshape(-1, 1)

        blocks = torch.arange(n_blocks, dtype=torch.int64, device=device).reshape(1, -1)
        counter = [blocks, col(step), col(self.call), col(self.replicas)]
        key = [col(self.ids), self.seed & _MASK32]
        return [torch.as_tensor(w, device=device).expand(len(self), n_blocks) for w in philox4x32(counter, key)]

    def uniform(self, step: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """U(0, 1) draws (open interval), shape (len(self), *shape)."""
        numel = math.prod(shape)
        words = self._words(step, numel, device)
        u = torch.stack(words, dim=-1).reshape(len(self), -1)[:, :numel]
        # 24 high bits + 0.5: strictly inside (0, 1), exact in float32.
        u = ((u >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
        return u.reshape(len(self), *shape).to(dtype)

    def normal(self, step, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) draws by Box-Muller, shape (len(self), *shape); on CUDA by the fused kernel."""
        device = torch.device(device) if device is not None else self.ids.device
        global _FUSED
        if device.type == "cuda" and _fused_available():
            try:
                from .philox_triton import normal as fused_normal

                with on_device(device):  # Triton launches on the current device
                    return fused_normal(self.to(device), step, shape, dtype)
            except Exception as exc:  # e.g. no C compiler for Triton's launcher: the tensor path is exact too
                if torch.cuda.is_current_stream_capturing():
                    raise
                warnings.warn(f"fused Triton noise unavailable ({type(exc).__name__}: {exc}); using the tensor path")
                _FUSED = False
        return self.normal_reference(step, shape, device, dtype)

    def normal_reference(self, step, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """`normal` in plain tensor arithmetic (any device): the definition the fused kernel matches."""
        numel = math.prod(shape)
        w0, w1, w2, w3 = self._words(step, numel, device)
        to_unit = lambda w: ((w >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)  # noqa: E731
        r0 = torch.sqrt(-2.0 * torch.log(to_unit(w0)))
        r1 = torch.sqrt(-2.0 * torch.log(to_unit(w2)))
        t0 = (2.0 * math.pi) * to_unit(w1)
        t1 = (2.0 * math.pi) * to_unit(w3)
        z = torch.stack([r0 * torch.cos(t0), r0 * torch.sin(t0), r1 * torch.cos(t1), r1 * torch.sin(t1)], -1)
        return z.reshape(len(self), -1)[:, :numel].reshape(len(self), *shape).to(dtype)


_FUSED: bool | None = None


def _fused_available() -> bool:
    """Whether Triton imports (checked once, only when a CUDA draw asks for it)."""
    global _FUSED
    if _FUSED is None:
        try:
            import triton  # noqa: F401
            _FUSED = True
        except ImportError:
            _FUSED = False
    return _FUSED
