"""`ChainKeys.normal` as one fused Triton kernel: Philox4x32-10 words and Box-Muller in registers.

The tensor version in `noise.py` launches ~100 small kernels per draw (ten rounds of int64
arithmetic on the whole chain batch); this kernel computes the same uint32 words (bit for bit:
same counter, key and rounds) and the same Box-Muller formula in float32, writing only the
normals. The normals agree with `normal_reference` to within 1e-5 absolute: log, sin and cos
may differ from the CPU's by an ulp or so, scaled by the radius (at most ~5.6).

Everything the kernel reads lives on the device (ids, replicates, call per chain, the step as
a 0-d int64 tensor or a Python int), so a CUDA graph can capture and replay it. Imported only
when a CUDA draw asks for it; `TRITON_INTERPRET=1` runs it on the CPU (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_MASK32 = 0xFFFFFFFF

BLOCK = 256  # Philox blocks (4 words each) per program


@triton.jit
def _round_keys(k0, k1):
    return k0 + tl.full(k0.shape, 0x9E3779B9, tl.uint32), k1 + tl.full(k1.shape, 0xBB67AE85, tl.uint32)


@triton.jit(do_not_specialize=["seed", "call_scalar"])
def _philox_kernel(out_ptr, ids_ptr, reps_ptr, call_ptr, step_ptr, seed, call_scalar, numel, n_blocks,
                   CALL_PER_ROW: tl.constexpr, WORDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], tl.uint32)
    if CALL_PER_ROW:
        call = tl.load(call_ptr + row)
    else:
        call = call_scalar.to(tl.int64)
    c0 = b.to(tl.uint32)
    c1 = zero + (tl.load(step_ptr) & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + (call & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + (tl.load(reps_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    k0 = zero + (tl.load(ids_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    k1 = zero + (seed.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    m0 = tl.full([BLOCK], 0xD2511F53, tl.uint32)
    m1 = tl.full([BLOCK], 0xCD9E8D57, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0, k1 = _round_keys(k0, k1)
        hi0, lo0 = tl.umulhi(c0, m0), c0 * m0
        hi1, lo1 = tl.umulhi(c2, m1), c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    base = row.to(tl.int64) * numel
    if WORDS:  # the raw words, block-major (w0, w1, w2, w3 of block 0, then block 1, ...)
        base = row.to(tl.int64) * n_blocks * 4
        m = b < n_blocks
        tl.store(out_ptr + base + 4 * b, c0.to(tl.int64), mask=m)
        tl.store(out_ptr + base + 4 * b + 1, c1.to(tl.int64), mask=m)
        tl.store(out_ptr + base + 4 * b + 2, c2.to(tl.int64), mask=m)
        tl.store(out_ptr + base + 4 * b + 3, c3.to(tl.int64), mask=m)
    else:
        u0 = ((c0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        u1 = ((c1 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        u2 = ((c2 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        u3 = ((c3 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        r0 = tl.sqrt_rn(-2.0 * tl.log(u0))
        r1 = tl.sqrt_rn(-2.0 * tl.log(u2))
        t0 = 6.283185307179586 * u1
        t1 = 6.283185307179586 * u3
        j = 4 * b
        tl.store(out_ptr + base + j, r0 * tl.cos(t0), mask=j < numel)
        tl.store(out_ptr + base + j + 1, r0 * tl.sin(t0), mask=j + 1 < numel)
        tl.store(out_ptr + base + j + 2, r1 * tl.cos(t1), mask=j + 2 < numel)
        tl.store(out_ptr + base + j + 3, r1 * tl.sin(t1), mask=j + 3 < numel)


def _launch(keys, step, numel: int, out: torch.Tensor, words: bool) -> torch.Tensor:
    device = out.device
    n, n_blocks = len(keys), (numel + 3) // 4
    if n == 0:
        return out
    step_t = step if isinstance(step, torch.Tensor) else torch.full((), step & _MASK32, dtype=torch.int64,
                                                                    device=device)
    per_row = isinstance(keys.call, torch.Tensor)
    call = keys.call.to(device=device, dtype=torch.int64).expand(n).contiguous() if per_row else keys.ids
    grid = (n, triton.cdiv(n_blocks, BLOCK))
    _philox_kernel[grid](out, keys.ids.contiguous(), keys.replicas.contiguous(), call, step_t,
                         keys.seed & _MASK32, 0 if per_row else int(keys.call) & _MASK32, numel, n_blocks,
                         CALL_PER_ROW=per_row, WORDS=words, BLOCK=BLOCK)
    return out


def normal(keys, step, shape, dtype=torch.float32) -> torch.Tensor:
    """`keys.normal(step, shape)` on the keys' device in one kernel (keys already there)."""
    numel = math.prod(shape)
    out = torch.empty(len(keys), numel, dtype=torch.float32, device=keys.ids.device)
    return _launch(keys, step, numel, out, words=False).reshape(len(keys), *shape).to(dtype)


def words(keys, step, numel: int) -> list[torch.Tensor]:
    """The four Philox words per (chain, block), as `ChainKeys._words`: for bit-exact tests."""
    n_blocks = (numel + 3) // 4
    out = torch.empty(len(keys), n_blocks * 4, dtype=torch.int64, device=keys.ids.device)
    w = _launch(keys, step, numel, out, words=True).reshape(len(keys), n_blocks, 4)
    return [w[..., k] for k in range(4)]
