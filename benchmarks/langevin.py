"""Image-steps per second of the project's Langevin sampler against the plain PyTorch loop.

The plain loop is what research scripts do: parameters left requiring grad, `autograd.grad` of
the summed energy, an in-place update with `torch.randn_like` noise, NCHW layout. Both run the
same EBM on the same batch, interleaved, in the same process; the best of `--repeats` rounds is kept.

    python benchmarks/langevin.py --batch 100 --steps 20 --width 32
Last line: `... ratio=<ours/plain>`.
"""
from __future__ import annotations

import argparse
import time

import torch

from distributed_ebm.method.langevin import langevin, prepare_energy
from distributed_ebm.method.nets import EBM
from distributed_ebm.method.noise import ChainKeys


def plain_loop(ebm, x, steps, step_size, noise):
    x = x.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        grad = torch.autograd.grad(ebm(x).sum(), x)[0]
        x = x.detach()
        x.sub_(step_size * grad).add_(noise * torch.randn_like(x))
    return x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    plain_ebm = EBM(a.width).to(device)
    ours_ebm = prepare_energy(EBM(a.width).to(device))
    ours_ebm.load_state_dict(plain_ebm.state_dict())
    x = torch.rand(a.batch, 3, 32, 32, device=device) * 2 - 1
    keys = ChainKeys.replicated(0, torch.arange(a.batch), 1)
    runs = {"plain": lambda: plain_loop(plain_ebm, x, a.steps, 1.0, 0.01),
            "ours": lambda: langevin(ours_ebm, x, keys, a.steps, 1.0, 0.01)}
    for fn in runs.values():  # warm-up
        fn()
    best = {k: float("inf") for k in runs}
    for _ in range(a.repeats):
        for name, fn in runs.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    rate = {k: a.batch * a.steps / v for k, v in best.items()}
    threads = torch.get_num_threads()
    print(f"device={device} threads={threads} batch={a.batch} steps={a.steps} width={a.width} "
          f"torch={torch.__version__}")
    for k in runs:
        print(f"{k:>5}: {rate[k]:10.1f} image-steps/s  ({1000 * best[k] / a.steps:.1f} ms/step)")
    print(f"ours={rate['ours']:.1f} plain={rate['plain']:.1f} image-steps/s ratio={rate['ours'] / rate['plain']:.3f}")


if __name__ == "__main__":
    main()
