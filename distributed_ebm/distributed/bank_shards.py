"""The persistent bank as shared replay-buffer actors: N slots sharded over M `BankShard` actors.

A slot is leased to one worker at a time: `lease` refuses a slot that is already held, and the
actor keeps the books (leases, returns, refusals) that the tests read. The bank and the model move
together: at a checkpoint each shard writes its own part straight into the checkpoint folder (all
shards in parallel, once), and a (re)started run has each shard load its part from the checkpoint
it resumes from, which also drops every lease, a crashed worker's too. A shard that dies is
restarted by Ray but comes back *lost*: its chains since the checkpoint are gone, so it refuses
leases and returns (`ShardLost`) until the run reloads it. The worker's call fails, Ray Train
restarts the run from the last checkpoint (counted against `ray.max_failures`), and model and bank
resume together, as after a worker's death. Transfers are one call per shard per lease or return.
"""
from __future__ import annotations

import numpy as np
import ray
import torch

from ..method.bank import ImageBank
from ..store.checkpoints import bank_part, load_bank, save_bank


class SlotBusy(RuntimeError):
    """A slot was asked for while another worker holds it."""


class ShardLost(RuntimeError):
    """A restarted shard has lost its chains since the checkpoint: the run must restart from it."""


def shard_bounds(size: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) slot ranges, as even as possible."""
    edges = np.linspace(0, size, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


@ray.remote(max_restarts=-1, max_task_retries=-1)
class BankShard:
    def __init__(self, lo: int, hi: int, shape, init: str, seed: int, data=None):
        self.lo, self.hi = lo, hi
        images = torch.from_numpy(np.array(data)).permute(0, 3, 1, 2) if data is not None else None  # uint8
        self.bank = ImageBank(hi - lo, tuple(shape), init, seed, images, offset=lo)
        self.holder = np.full(hi - lo, -1, dtype=np.int64)
        self.books = {"leases": 0, "returns": 0, "refused": 0, "unheld_returns": 0}
        self.lost = ray.get_runtime_context().was_current_actor_reconstructed

    def _alive(self) -> None:
        if self.lost:
            raise ShardLost(f"bank shard [{self.lo}, {self.hi}) was restarted and lost its chains since the "
                            "last checkpoint; the run restarts from that checkpoint")

    def lease(self, slots: np.ndarray, restart: np.ndarray, call: int, holder: int):
        self._alive()
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
        self._alive()
        slots, restart = np.array(slots), np.array(restart)
        local = slots - self.lo
        self.books["unheld_returns"] += int((self.holder[local] != holder).sum())  # e.g. after a restart
        self.bank.write(torch.from_numpy(slots), torch.from_numpy(np.array(states)), steps_taken,
                        torch.from_numpy(restart))
        self.holder[local] = -1
        self.books["returns"] += len(slots)

    def books_and_leases(self) -> dict:
        return {**self.books, "leased_now": int((self.holder != -1).sum())}

    def save(self, url: str) -> None:
        """Write this shard's part of the bank (at a checkpoint, straight to storage)."""
        self._alive()
        save_bank(self.bank, url)

    def load(self, url: str | None) -> None:
        """Come back from a checkpoint's part (or the initial bank for None); all leases are dropped."""
        if url is None:
            self.bank.reset()
        else:
            load_bank(self.bank, url)
        self.holder[:] = -1
        self.lost = False

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

    def give_back(self, slots: torch.Tensor, states: torch.Tensor, steps_taken: int, restart: torch.Tensor,
                  holder: int):
        states = states.detach().cpu().contiguous().numpy()
        ray.get([h.give_back.remote(slots[r].numpy(), states[r.numpy()], steps_taken, restart[r].numpy(), holder)
                 for h, r in self._split(slots)])

    def books(self) -> list[dict]:
        return ray.get([h.books_and_leases.remote() for h in self.shards])

    @staticmethod
    def part(folder: str, k: int) -> str:
        return bank_part(folder, k)

    def save(self, folder: str) -> None:
        """Every shard writes its part into `folder`, in parallel."""
        ray.get([h.save.remote(self.part(folder, k)) for k, h in enumerate(self.shards)])

    def load(self, folder: str | None) -> None:
        """Every shard loads its part from the checkpoint `folder` (None: the initial bank)."""
        ray.get([h.load.remote(folder and self.part(folder, k)) for k, h in enumerate(self.shards)])

    def sample(self, n: int) -> np.ndarray:
        return ray.get(self.shards[0].sample.remote(n))
