"""Job: `debm tune-training`. Usage: python jobs/tune_training.py --config jobs/configs/tune_training.yaml [key=value ...]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _entry import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("tune-training")
