"""Progress for long work: a tqdm bar on a terminal, periodic lines (rate, ETA) in logs."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """`update(n, **metrics)`; when stderr is not a terminal, prints a line at each tenth of the work
    and at least every `every` seconds (so a job's log stays about a screen long)."""

    def __init__(self, total: int, name: str, start: int = 0, enabled: bool = True, every: float = 60.0, unit: str = "it",
                 t0: float | None = None):
        """`t0`: when the work began, if before now (a driver following a worker's progress)."""
        self.total, self.name, self.done, self.unit = total, name, start, unit
        self.enabled, self.every = enabled, every
        self.last = time.time()
        self.t0 = t0 if t0 is not None else self.last
        self.step = max(total / 10, 1)
        self.mark = (start // self.step + 1) * self.step
        self.start = start
        self.bar = tqdm(total=total, initial=start, desc=name, unit=unit, dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None

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
