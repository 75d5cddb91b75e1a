"""The persistent bank as shared replay-buffer actors: N slots sharded over M `BankShard` actors.

A slot is leased to one worker at a time: `lease` refuses a slot that is already held, and the
actor keeps the books (leases, returns, refusals) that the tests read. Leases of a crashed worker
go back to the pool when the restarted run reloads the bank from its checkpoint (`load`). Each shard backs itself up at every checkpoint; a shard that
dies is restarted by Ray (max_restarts=-1) and reloads its last backup, while the workers' calls
are retried on the new actor (max_task_retries=-1), so the run goes on. Transfers are one call
per shard per lease or return, as numpy arrays.
"""
from __future__ import annotations

import numpy as np
import ray
import torch

from .. import storage
from ..bank import ImageBank
from ..data import to_unit_range


class SlotBusy(RuntimeError):
    """A slot was asked for while another worker holds it."""


def shard_bounds(size: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slot ranges, as even as possible."""
    edges = np.linspace(0, size, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@ray.remote(max_restarts=-1, max_task_retries=-1)
class BankShard:
    def __init__(self, lo: int, hi: int, shape, init: str, seed: int, backup_url: str, data=None):
        self.lo, self.hi, self.backup_url = lo, hi, backup_url
        images = to_unit_range(data) if data is not None else None
        self.bank = ImageBank(hi - lo, tuple(shape), init, seed, images, offset=lo)
        self.holder = np.full(hi - lo, -1, dtype=np.int64)
        self.books = {"leases": 0, "returns": 0, "refused": 0, "unheld_returns": 0, "restored_from_backup": 0}
        if storage.exists(backup_url):  # a restarted actor: come back from the last checkpoint
            self.bank.load_state_dict(storage.load_torch(backup_url))
            self.books["restored_from_backup"] = 1

    def lease(self, slots: np.ndarray, restart: np.ndarray, call: int, holder: int):
        slots, restart = np.array(slots), np.array(restart)  # Ray's arrays are read-only
        local = slots - self.lo
        busy = self.holder[local] != -1
        if busy.any():
            self.books["refused"] += int(busy.sum())
            raise SlotBusy(f"slots {slots[busy][:5].tolist()} are leased to worker(s) "
                           f"{sorted(set(self.holder[local][busy].tolist()))}")
        self.holder[local] = holder
        self.books["leases"] += len(slots)
        x = self.bank.read(torch.from_numpy(slots), torch.from_numpy(restart), call)
        return x.numpy(), self.bank.steps[local].numpy().copy()

    def give_back(self, slots: np.ndarray, states: np.ndarray, steps_taken: int, restart: np.ndarray, holder: int):
        slots, restart = np.array(slots), np.array(restart)
        local = slots - self.lo
        self.books["unheld_returns"] += int((self.holder[local] != holder).sum())  # e.g. after a restart
        self.bank.write(torch.from_numpy(slots), torch.from_numpy(np.array(states)), steps_taken,
                        torch.from_numpy(restart))
        self.holder[local] = -1
        self.books["returns"] += len(slots)

    def books_and_leases(self) -> dict:
        return {**self.books, "leased_now": int((self.holder != -1).sum())}

    def state(self) -> dict:
        return self.bank.state_dict()

    def load(self, state: dict | None) -> None:
        """Restore a checkpointed state (or the initial one for None); all leases are dropped."""
        if state is None:
            self.bank.reset()
        else:
            self.bank.load_state_dict(state)
        self.holder[:] = -1

    def backup(self) -> None:
        storage.save_torch(self.bank.state_dict(), self.backup_url)

    def sample(self, n: int) -> np.ndarray:
        return self.bank.states[:n].numpy()


class ShardedBank:
    """A worker's view of the shards: lease and return chains by global slot id, one call per shard."""

    def __init__(self, shards: list, bounds: list[tuple[int, int]]):
        self.shards, self.bounds = shards, bounds

    def _split(self, slots: torch.Tensor):
        for handle, (lo, hi) in zip(self.shards, self.bounds):
            rows = ((slots >= lo) & (slots < hi)).nonzero().flatten()
            if len(rows):
                yield handle, rows

    def lease(self, slots: torch.Tensor, restart: torch.Tensor, call: int, holder: int):
        parts = list(self._split(slots))
        got = ray.get([h.lease.remote(slots[r].numpy(), restart[r].numpy(), call, holder) for h, r in parts])
        x = torch.empty((len(slots), *got[0][0].shape[1:]), dtype=torch.float32)
        steps = torch.empty(len(slots), dtype=torch.int64)
        for (_, rows), (states, age) in zip(parts, got):
            x[rows] = torch.from_numpy(np.array(states))
            steps[rows] = torch.from_numpy(np.array(age))
        return x, steps

    def give_back(self, slots: torch.Tensor, states: torch.Tensor, steps_taken: int, restart: torch.Tensor, holder: int):
        states = states.detach().cpu().contiguous().numpy()
        ray.get([h.give_back.remote(slots[r].numpy(), states[r.numpy()], steps_taken, restart[r].numpy(), holder)
                 for h, r in self._split(slots)])

    def books(self) -> list[dict]:
        return ray.get([h.books_and_leases.remote() for h in self.shards])

    def states(self) -> list[dict]:
        return ray.get([h.state.remote() for h in self.shards])

    def load(self, states: list[dict] | None) -> None:
        ray.get([h.load.remote(None if states is None else s) for h, s in zip(self.shards, states or [None] * len(self.shards))])

    def backup(self) -> None:
        ray.get([h.backup.remote() for h in self.shards])

    def sample(self, n: int) -> np.ndarray:
        return ray.get(self.shards[0].sample.remote(n))
