"""The persistent image bank: one Langevin chain per slot, advanced K steps each time it is drawn.

Plain PyTorch; each replay-buffer actor of the distributed trainer wraps one `ImageBank` over a
range of slots. Fresh chain starts are keyed by (seed, slot id, call), so a bank built in one
piece or in shards starts every chain at the same place, and a restart is reproducible. `reburn`
rebuilds a bank that did not travel with its checkpoint; `energy_stats` measures a bank under an EBM.
"""
from __future__ import annotations

import torch
from torch import nn

from .langevin import langevin
from .noise import ChainKeys
from .pixels import unit_range

CALL_INIT = 0x7FFF0002  # the call number of the initial starts; rejuvenation at iteration t uses call t
CALL_REBURN = 0x7FFF0003  # the noise of a re-burn; its replicate number is the iteration it resumes at
# The replica word of a rejuvenated start: the training chain of iteration t draws its noise with call t and
# replica 0, so a restart drawn there too would reuse its first step's Philox words.
STREAM_REJUVENATION = 1


class ImageBank:
    """Chains for global slot ids offset .. offset + size - 1, with the Langevin steps each has run."""

    def __init__(self, size: int, shape: tuple[int, ...], init: str = "noise", seed: int = 0,
                 data: torch.Tensor | None = None, offset: int = 0):
        if size < 1:
            raise ValueError(f"bank size must be at least 1 (got {size})")
        if init not in ("noise", "data"):
            raise ValueError(f"bank init must be 'noise' or 'data' (got {init!r})")
        if init == "data" and (data is None or len(data) == 0):
            raise ValueError("bank init 'data' needs the training images")
        self.shape, self.init, self.seed, self.data, self.offset = tuple(shape), init, seed, data, offset
        self.reset(size)

    def __len__(self) -> int:
        return self.states.shape[0]

    def reset(self, size: int | None = None) -> None:
        """Every chain back to its initial start."""
        slots = torch.arange(self.offset, self.offset + (size or len(self)))
        self.states = self.fresh(slots, CALL_INIT)
        self.steps = torch.zeros(len(slots), dtype=torch.int64)

    def fresh(self, slots: torch.Tensor, call: int, stream: int = 0) -> torch.Tensor:
        """New starts for these slots: uniform noise in [-1, 1], or a random training image (keyed by
        (seed, slot, call, stream): stream 0 the initial starts, STREAM_REJUVENATION the restarts)."""
        keys = ChainKeys(self.seed, slots, torch.full_like(slots, stream), call)
        if self.init == "noise":
            return keys.uniform(0, self.shape) * 2 - 1
        pick = (keys.uniform(0, (1,)).flatten() * len(self.data)).long().clamp(max=len(self.data) - 1)
        return unit_range(self.data[pick]).float().clone()

    def read(self, slots: torch.Tensor, restart: torch.Tensor | None = None, call: int = 0) -> torch.Tensor:
        """The chains in these (global) slots; those flagged in `restart` start afresh instead."""
        x = self.states[slots - self.offset].clone()
        if restart is not None and restart.any():
            x[restart] = self.fresh(slots[restart], call, STREAM_REJUVENATION)
        return x

    def write(self, slots: torch.Tensor, states: torch.Tensor, steps_taken: int,
              restart: torch.Tensor | None = None) -> None:
        local = slots - self.offset
        self.states[local] = states.detach().to(self.states.dtype).cpu().contiguous()
        if restart is not None:
            self.steps[local[restart]] = 0
        self.steps[local] += steps_taken

    def state_dict(self) -> dict:
        return {"states": self.states, "steps": self.steps, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["states"].shape[1:]) != self.shape or state["states"].shape[0] != len(self):
            raise ValueError(f"bank checkpoint holds {tuple(state['states'].shape)} chains, "
                             f"expected {(len(self), *self.shape)}")
        self.states = state["states"].clone()
        self.steps = state["steps"].clone()


def reburn(bank: ImageBank, ebm: nn.Module, cfg, steps: int, resume_at: int,
           device: str | torch.device = "cpu", chunk: int = 10_000, target: float | None = None, check: int = 10,
           on_chunk=None) -> int:
    """Rebuild the whole bank: fresh starts from `bank_init`, then Langevin steps under `ebm`; returns the steps.

    With `target` (the bank's mean energy at the last save, measured under this same EBM) the first chunk
    runs, `check` steps at a time, until its mean energy falls to the target (at most `steps`), and every
    other chunk then runs as many steps; without it, every chain runs `steps`. The noise is keyed by
    (seed, slot, resume iteration), and a chain continued in pieces draws what it would in one run.
    """
    bank.reset()
    lv = cfg.langevin
    slots = torch.arange(bank.offset, bank.offset + len(bank))
    for lo in range(0, len(bank), chunk):
        s = slots[lo:lo + chunk]
        keys = ChainKeys(cfg.seed, s, torch.full_like(s, resume_at), CALL_REBURN)
        x = bank.states[s - bank.offset].to(device)
        if lo == 0 and target is not None:
            done = 0
            while done < steps and energy_stats(ebm, x, device)["mean"] > target:
                n = min(check, steps - done)
                x, done = langevin(ebm, x, keys, n, lv.step_size, lv.noise, start_step=done), done + n
            steps = done
        elif steps:
            x = langevin(ebm, x, keys, steps, lv.step_size, lv.noise)
        bank.states[s - bank.offset] = x.cpu().contiguous()
        if on_chunk:
            on_chunk(min(lo + chunk, len(bank)), steps)
    bank.steps[:] = steps
    return steps


@torch.no_grad()
def energy_stats(ebm: nn.Module, states: torch.Tensor, device: str | torch.device = "cpu", count: int | None = None,
                 chunk: int = 2000) -> dict:
    """Mean and sd of f over `count` chains spread evenly through the bank (all of them for None)."""
    n = len(states) if count is None else min(count, len(states))
    rows = torch.linspace(0, len(states) - 1, n).round().long()
    f = torch.cat([ebm(states[rows[i:i + chunk]].to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
                   for i in range(0, n, chunk)])
    return {"mean": f.mean().item(), "std": f.std().item() if n > 1 else 0.0, "chains": n}
