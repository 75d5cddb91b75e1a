"""Job: `debm train-ebm`, runnable from a bare checkout (the repository root goes on sys.path).

Usage: python3 jobs/train_ebm.py --config jobs/configs/FILE.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed_ebm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-ebm", *sys.argv[1:]]))
