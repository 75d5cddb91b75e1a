"""Progress for long work, on the console: a tqdm bar on a terminal, periodic lines (rate, ETA) in logs.

A run whose work happens elsewhere (Ray Train's workers) reports through a board: its rank 0 posts where it is
(`Reporter`), the board keeps the last post and each (re)start (`ProgressBoard`), and the driver prints from it
(`follow`). Everything here is plain Python and imports nothing of the project, torch or Ray: Ray makes the board
an actor whose process loads this module only (tests/test_core_without_ray.py)."""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """`update(n, **metrics)`; when stderr is not a terminal, prints a line at each tenth of the work
    and at least every `every` seconds (so a job's log stays about a screen long)."""

    def __init__(self, total: int, name: str, start: int = 0, enabled: bool = True, every: float = 60.0,
                 unit: str = "it",
                 t0: float | None = None):
        """`t0`: when the work began, if before now (a driver following a worker's progress)."""
        self.total, self.name, self.done, self.unit = total, name, start, unit
        self.enabled, self.every = enabled, every
        self.last = time.time()
        self.t0 = t0 if t0 is not None else self.last
        self.step = max(total / 10, 1)
        self.mark = (start // self.step + 1) * self.step
        self.start = start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # here, so that the board's actor process does not load it
            self.bar = tqdm(total=total, initial=start, desc=name, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **metrics) -> None:
        self.done += n
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()}
        if self.bar is not None:
            self.bar.update(n)
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            return
        now = time.time()
        if now - self.last >= self.every or self.done >= self.mark or self.done >= self.total:
            self.last, self.mark = now, (self.done // self.step + 1) * self.step
            rate = (self.done - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"[{self.name}] {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.1f}%) "
                  f"{rate:.3g} {self.unit}/s ETA {_clock(eta)} {extra}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ProgressBoard:
    """Where a run's reporter posts where it is, and each (re)start of its workers; the driver reads it for
    its one progress line and a line per restart (the workers' own output stays in Ray's log files)."""

    def __init__(self):
        self.last, self.starts = None, []

    def post(self, state: tuple) -> None:
        self.last = state

    def started(self, done: int) -> None:
        self.starts.append(done)

    def read(self):
        return self.last, self.starts


class Reporter:
    """`update(n, **metrics)` where the work runs; with `post` (a board's), at most once a second it posts
    `(done, start, total, name, metrics, t0)`, which `follow` shows. Without, it only counts."""

    def __init__(self, total: int, name: str, start: int = 0, post: Callable[[tuple], object] | None = None,
                 started: Callable[[int], object] | None = None):
        self.post = post
        self.total, self.name, self.start, self.done = total, name, start, start
        self.metrics, self.posted, self.t0 = {}, 0.0, time.time()
        if started is not None:
            started(start)

    def update(self, n: int = 1, **metrics) -> None:
        self.done += n
        self.metrics = metrics
        if self.post is not None and (time.time() - self.posted >= 1.0 or self.done >= self.total):
            self.posted = time.time()
            self.post((self.done, self.start, self.total, self.name, metrics, self.t0))

    def close(self) -> None:
        if self.post is not None:
            self.post((self.done, self.start, self.total, self.name, self.metrics, self.t0))


def follow(read: Callable[[], tuple], stop: threading.Event, every: float = 2.0) -> None:
    """The driver's progress line: what the board (`read()` -> `(last, starts)`) last held, every `every`
    seconds until `stop` is set; a board that cannot be read skips a tick. Every start after the first is a
    restart after a loss (Ray Train's, from the run's last checkpoint), and gets a line of its own."""
    bar, restarts = None, 0
    while True:
        stopped = stop.wait(every)
        try:
            last, starts = read()
        except Exception:  # the board is gone or slow: skip this tick
            last, starts = None, []
        for done in starts[1 + restarts:]:
            restarts += 1
            print(f"{last[3] if last else 'train'}: lost a worker or a bank shard; Ray Train restarted the run "
                  f"from its last checkpoint ({done:,} of {last[2] if last else '?'} done; restart {restarts})",
                  file=sys.stderr, flush=True)
        if last:
            done, start, total, name, metrics, t0 = last
            if bar is None:  # the rate counts from the worker's start, not from the first look
                bar = Progress(total, name, start=start, t0=t0)
            if done > bar.done:
                bar.update(done - bar.done, **metrics)
        if stopped:
            break
    if bar is not None:
        bar.close()
