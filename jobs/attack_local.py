"""Job: run an attack config in one process on one device, without Ray (any machine with one GPU; docs/gpu.md).

Usage: python3 jobs/attack_local.py --config jobs/configs/attack_mefa.yaml [--device cuda] [key=value ...]
Runs from a bare checkout (the repository root goes on sys.path).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distributed_ebm.local.attack_local import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
