"""The persistent image bank: one Langevin chain per slot, advanced K steps each time it is drawn.

Plain PyTorch; each replay-buffer actor of the distributed trainer wraps one `ImageBank` over a
range of slots. Fresh chain starts are keyed by (seed, slot id, call), so a bank built in one
piece or in shards starts every chain at the same place, and a restart is reproducible.
"""
from __future__ import annotations

import torch

from .pixels import unit_range
from .noise import ChainKeys

CALL_INIT = 0x7FFF0002  # the call number of the initial starts; rejuvenation at iteration t uses call t
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
