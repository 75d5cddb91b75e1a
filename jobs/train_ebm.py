"""Job: `debm train-ebm`. Usage: python jobs/train_ebm.py --config jobs/configs/FILE.yaml [key=value ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _entry import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("train-ebm")
