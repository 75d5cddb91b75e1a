"""Job: `debm train-ebm-gpu`, runnable from a bare checkout (the repository root goes on sys.path).

Usage: python3 jobs/train_ebm_gpu.py --config jobs/configs/train_ebm_cifar10.yaml --minutes 8 --out DIR \\
           [--resume CKPT] [--keep-bank] [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed_ebm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-ebm-gpu", *sys.argv[1:]]))
