#!/usr/bin/env bash
# The Ray GPU path on a machine with one GPU, Python 3.12, no network and no Ray (docs/gpu.md): installs the stripped
# Ray that `bash benchmarks/device/prepare_device_ray.sh` left in .device-ray/cp312 and the config loader's wheels
# from .device/whl (`bash benchmarks/device/prepare_device.sh`), then runs benchmarks/device/ray_gpu_smoke.py.
# Run from the repository root. Writes $OUT/ray/ray_gpu_smoke.json and $OUT/ray_smoke.log; prints the smoke run's
# table last.
set -u
out=${OUT:?OUT: the folder whose files come back}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .device/whl/*.whl .device-ray/cp312/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD DEBM_SHARED=$PWD/.device/shared PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 420 python3 benchmarks/device/ray_gpu_smoke.py --out "$out/ray" >"$out/ray_smoke.log" 2>&1
echo "ray smoke exit $?"
tail -n 6 "$out/ray_smoke.log"
