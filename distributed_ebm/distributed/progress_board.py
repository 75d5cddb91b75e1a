"""The progress board of a Ray Train run, in a module of its own that imports nothing: its actor's process loads
Ray and this file, not torch and the project (every run starts one; see tests/test_core_without_ray.py)."""


class ProgressBoard:
    """A tiny actor: rank 0 posts where the run is, and each (re)start of the workers; the driver reads it for
    its one progress line and a line per restart (the workers' own output stays in Ray's log files)."""

    def __init__(self):
        self.last, self.starts = None, []

    def post(self, state: tuple) -> None:
        self.last = state

    def started(self, done: int) -> None:
        self.starts.append(done)

    def read(self):
        return self.last, self.starts
