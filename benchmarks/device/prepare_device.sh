#!/usr/bin/env bash
# Fill .device/ (ignored by git) with what a machine with one GPU, no network and no Ray lacks for jobs/train_ebm_gpu.py and
# benchmarks/gpu_check.py: the training and exact test images and the ResNet-20 weights (../shared does
# not travel), and the wheels of pydantic and OmegaConf (the config loader) for its Python 3.12 (it has
# no network). Copy `.device` there beside the checkout (docs/gpu.md). Run from anywhere; idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
shared="${DEBM_SHARED:-../shared}"
mkdir -p .device/shared/datasets/cifar10 .device/shared/weights .device/whl
cp "$shared/datasets/cifar10/train.parquet" "$shared/datasets/cifar10/test-exact-1000.parquet" .device/shared/datasets/cifar10/
cp "$shared/weights/resnet20-12fca82f.th" .device/shared/weights/
# The versions this project is tested with; pydantic pins pydantic-core exactly and needs
# typing-extensions >= 4.16, newer than the image may hold.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .device/whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 omegaconf==2.4.0
du -sh .device
