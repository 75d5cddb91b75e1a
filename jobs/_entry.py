"""Shared by the job files: parse `--config FILE key=value ...` and call the library."""
from __future__ import annotations

import sys

from distributed_ebm.cli import main


def run_job(command: str) -> None:
    sys.exit(main([command, *sys.argv[1:]]))
