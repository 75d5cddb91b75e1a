"""Time and peak memory of one attack gradient through the defense: BPDA vs the exact gradient.

One batch of images, one chain each, the paper's EBM (random weights: the cost does not depend on
them) and a CIFAR ResNet-20. For each K: the BPDA gradient (chain without a graph, classifier
gradient at the purified point) and the exact gradient through all K steps, checkpointed every
round(sqrt(K)) steps (`--segment` to override); `--unrolled K` adds the exact gradient without
checkpointing at that K, for contrast. Times are the best of `--repeats` runs without the
profiler; peak memory is the allocator's figure (CUDA: max_memory_allocated; CPU: PyTorch's CPU
allocator books, read through the profiler) in a separate run.

    python benchmarks/exact_gradient.py --batch 10 --steps 100 1500 --unrolled 100
"""
from __future__ import annotations

import argparse
import time

import torch
from langevin import sync  # benchmarks/langevin.py, beside this script

from distributed_ebm.method.defense import EOTDefense, Purifier
from distributed_ebm.method.exact_chain import default_segment
from distributed_ebm.method.memory import peak_allocated_bytes
from distributed_ebm.method.nets import EBM
from distributed_ebm.method.nets.classifiers import build_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 1500])
    p.add_argument("--segment", type=int, default=None)
    p.add_argument("--unrolled", type=int, nargs="*", default=[100])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    ebm = EBM(a.width).to(device)
    clf = build_classifier("resnet20").to(device).eval()
    x = torch.rand(a.batch, 3, 32, 32, device=device) * 2 - 1
    y = torch.randint(0, 10, (a.batch,), device=device)
    ids = torch.arange(a.batch)

    cases = []
    for k in a.steps:
        cases.append(("bpda", k, None))
        cases.append(("exact", k, a.segment or default_segment(k)))
    cases += [("exact", k, k) for k in a.unrolled]

    print(f"device={device} batch={a.batch} width={a.width} threads={torch.get_num_threads()}")
    print(f"{'gradient':<9} {'K':>5} {'segment':>7} {'seconds':>9} {'image-steps/s':>13} {'peak MiB':>9}")
    for kind, k, segment in cases:
        defense = EOTDefense(clf, Purifier(ebm, k, 1.0, 0.01), chunk_size=a.batch)

        def work():
            defense.logits_and_grad(x, y, ids, seed=0, call=0, replicates=1, exact=kind == "exact", segment=segment)

        best = float("inf")
        for _ in range(a.repeats):
            sync(device)
            t = time.perf_counter()
            work()
            sync(device)
            best = min(best, time.perf_counter() - t)
        peak = peak_allocated_bytes(work, device) / 2**20
        label = "unrolled" if segment == k else (str(segment) if segment else "-")
        print(f"{kind:<9} {k:>5} {label:>7} {best:>9.2f} {a.batch * k / best:>13.1f} {peak:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
