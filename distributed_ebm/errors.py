"""The errors a user meets, and how every entry point turns them into one line and an exit code.

Imported by every layer; imports nothing of the project, so raising `InputError` pulls in no schema.
"""
from __future__ import annotations

import sys
from typing import Callable


class InputError(ValueError):
    """Bad input from a user (config, data, checkpoint): the message says what and where."""


class ConfigError(InputError):
    """A config that cannot run; the message is one line naming the key."""


class JobFailed(RuntimeError):
    """A job that cannot go on for a reason outside its input (e.g. lost capacity): one line, exit 1."""


class Interrupted(Exception):
    """Ctrl-C: what was done is kept and the same command continues (one line, exit 130, as a shell's SIGINT)."""


def run_job(prog: str, job: Callable[[], int | None]) -> int:
    """Run a job's body and return its exit code: 0, or for the failures users cause or meet one line on
    stderr and 2 for bad input, 1 for a job that cannot go on, 130 for Ctrl-C where the job says what it kept
    (anything else keeps its traceback). Every entry point runs its body through it."""
    try:
        return job() or 0
    except (InputError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 130
