"""Job: `debm attack`, runnable from a bare checkout (the repository root goes on sys.path).

Usage: python3 jobs/attack.py --config jobs/configs/FILE.yaml [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed_ebm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["attack", *sys.argv[1:]]))
