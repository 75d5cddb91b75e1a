"""Job: train the EBM in one process within a time budget, resumable from a compact checkpoint (no Ray).

Usage: python3 jobs/train_ebm_gpu.py --config jobs/configs/train_ebm_cifar10.yaml --minutes 8 \
           [--resume models/ebm-cifar10-gpu/ckpt.pt] --out DIR [key=value ...]
Runs from a bare checkout (the repository root goes on sys.path): for any machine with one GPU and no Ray (docs/gpu.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed_ebm.local.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
