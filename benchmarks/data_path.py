"""The driver's cost of reading and selecting images: wall time and peak memory (RSS) of one process.

`read_images` decodes the chosen images on the driver (the single-process loops and the training driver);
`catalog` is what the attack driver does: ids and labels only, the cluster reads the pixels. Run it
against another checkout (PYTHONPATH) for a before/after; one process per measurement, so the peak
is this work's alone (plus the imports, measured apart as `baseline`).

    python benchmarks/data_path.py --path ../shared/datasets/cifar10/train.parquet --count 10000 --mode read_images
"""
import argparse
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--path", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mode", choices=["read_images", "catalog"], default="read_images")
    a = p.parse_args()
    from distributed_ebm.config import DataConfig
    from distributed_ebm.store import data

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    cfg = DataConfig(path=a.path, random=a.count, subset_seed=0)
    chosen = data.read_images(cfg) if a.mode == "read_images" else data.catalog(cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": a.mode, "path": a.path, "images": len(chosen), "seconds": round(seconds, 2),
                      "peak_rss_mib": round(peak), "imports_rss_mib": round(baseline)}))


if __name__ == "__main__":
    main()
