"""Throughput of the Ray Data evaluation engine against the single-process loop on the same work.

Both run the same BPDA+EOT attack (ResNet-20 from ../shared/weights, a paper-sized EBM of width
32 with random weights scaled down so purification keeps the images, as training would; speed does
not depend on the weights) on the same images with the same seed, one after the other in the same
process on the same machine. Throughput = Langevin image-steps done / wall seconds, the Ray run
including its start-up. The job sizes are chosen so each engine runs for at least two minutes.

    python benchmarks/pipeline.py --images 24 --purify-steps 100
Last line: `... ratio=<pipeline/single>`.
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from distributed_ebm.config import AttackConfig, load_config  # noqa: E402
from distributed_ebm.distributed.attack import RayActors  # noqa: E402
from distributed_ebm.local.attack import OneProcess  # noqa: E402
from distributed_ebm.method.nets import EBM  # noqa: E402
from distributed_ebm.recipes.attack import run_attack  # noqa: E402
from distributed_ebm.store.checkpoints import save_ebm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--purify-steps", type=int, default=100)
    p.add_argument("--attack-steps", type=int, default=5)
    p.add_argument("--eot", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=1)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="debm-bench-")
    torch.manual_seed(0)
    ebm = EBM(width=32)
    with torch.no_grad():
        ebm.net[-1].weight.mul_(1e-3)
    save_ebm(ebm, f"{tmp}/ebm.pt")

    def cfg(out: str) -> AttackConfig:
        return load_config(AttackConfig, "jobs/configs/attack_bpda_eot.yaml", [
            f"ebm={tmp}/ebm.pt", f"data.count={a.images}", f"purify.steps={a.purify_steps}",
            f"attack.steps={a.attack_steps}", f"attack.eot_attack={a.eot}", f"attack.eot_defense={2 * a.eot}",
            f"batch_size={a.batch}", f"output={tmp}/{out}", f"ray.actors={a.actors}",
            f"ray.cpus_per_actor={a.cpus_per_actor}", "mlflow.enabled=false"])

    single = run_attack(cfg("single"), OneProcess("cpu"))
    piped = run_attack(cfg("ray"), RayActors())
    for name, s in (("single", single), ("pipeline", piped)):
        print(f"{name:>8}: {s['image_steps']} image-steps in {s['seconds']:.1f} s = "
              f"{s['image_steps_per_second']:.1f} image-steps/s; robust {s['robust_accuracy']:.3f}")
    assert single["image_steps"] == piped["image_steps"], "the two engines did different work"
    print(f"threads={torch.get_num_threads()} actors={a.actors} cpus_per_actor={a.cpus_per_actor} images={a.images} "
          f"single={single['image_steps_per_second']:.1f} pipeline={piped['image_steps_per_second']:.1f} "
          f"ratio={piped['image_steps_per_second'] / single['image_steps_per_second']:.3f}")


if __name__ == "__main__":
    main()
