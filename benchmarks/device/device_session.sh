#!/usr/bin/env bash
# One session on a machine with one GPU, no network and no Ray (docs/gpu.md; benchmarks/README.md, "The GPU check"):
# the GPU check, then EBM training for the rest of the call, resumed from the committed checkpoint.
# Prepare first, on a machine with the network: `bash benchmarks/device/prepare_device.sh`; `.device` travels with
# the checkout. From the repository root:
#
#     bash benchmarks/device/device_session.sh CHECK_BUDGET_S TRAIN_MINUTES     (0 skips that part)
#
# Writes under $OUT (at most 8 files come back): gpu_check.json, gpu_check.log, train.log and
# train/{ckpt.pt, curves.png, README.md, samples-sNN.png}. Each part runs even if the one before failed.
set -u
check_s=${1:?CHECK_BUDGET_S}
minutes=${2:?TRAIN_MINUTES}
out=${OUT:?OUT: the folder whose files come back}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD DEBM_SHARED=$PWD/.device/shared PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$check_s" != 0 ]; then
    timeout $((check_s + 40)) python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" --budget "$check_s" >"$out/gpu_check.log" 2>&1
    echo "gpu_check exit $?"
fi
if [ "$minutes" != 0 ]; then
    resume=()
    [ -f models/ebm-cifar10-gpu/ckpt.pt ] && resume=(--resume models/ebm-cifar10-gpu/ckpt.pt)
    python3 jobs/train_ebm_gpu.py --config jobs/configs/train_ebm_cifar10.yaml --minutes "$minutes" "${resume[@]}" \
        --out "$out/train" >"$out/train.log" 2>&1
    echo "train exit $?"
fi
[ -f "$out/gpu_check.log" ] && tail -n 45 "$out/gpu_check.log"
[ -f "$out/train.log" ] && tail -n 25 "$out/train.log"
exit 0
