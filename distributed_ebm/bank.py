"""The persistent image bank: one Langevin chain per slot, advanced K steps each time it is drawn.

Plain PyTorch; the distributed replay-buffer actors wrap one of these per shard.
"""
from __future__ import annotations

import torch


class ImageBank:
    """`size` chain states (C x H x W each) and how many Langevin steps each has run since it started."""

    def __init__(self, size: int, shape: tuple[int, ...], init: str = "noise", data: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        if size < 1:
            raise ValueError(f"bank size must be at least 1 (got {size})")
        self.shape, self.init = tuple(shape), init
        self.data = data
        self.states = self.fresh(size, generator)
        self.steps = torch.zeros(size, dtype=torch.int64)

    def __len__(self) -> int:
        return self.states.shape[0]

    def fresh(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """New chain starts: uniform noise in [-1, 1], or random data images."""
        if self.init == "noise":
            return torch.rand((n, *self.shape), generator=generator) * 2 - 1
        if self.init == "data":
            if self.data is None or len(self.data) == 0:
                raise ValueError("bank init 'data' needs the training images")
            return self.data[torch.randint(len(self.data), (n,), generator=generator)].clone()
        raise ValueError(f"bank init must be 'noise' or 'data' (got {self.init!r})")

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n distinct random slots."""
        if n > len(self):
            raise ValueError(f"cannot draw {n} chains from a bank of {len(self)}")
        return torch.randperm(len(self), generator=generator)[:n]

    def read(self, slots: torch.Tensor, rejuvenation: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """The chains in `slots`; with probability `rejuvenation` each restarts from a fresh start."""
        x = self.states[slots].clone()
        if rejuvenation > 0:
            restart = torch.rand(len(slots), generator=generator) < rejuvenation
            if restart.any():
                x[restart] = self.fresh(int(restart.sum()), generator)
                self.steps[slots[restart]] = 0
        return x

    def write(self, slots: torch.Tensor, states: torch.Tensor, steps_taken: int) -> None:
        self.states[slots] = states.detach().to(self.states.dtype).cpu().contiguous()
        self.steps[slots] += steps_taken

    def state_dict(self) -> dict:
        return {"states": self.states, "steps": self.steps, "init": self.init}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["states"].shape[1:]) != self.shape:
            raise ValueError(f"bank checkpoint holds {tuple(state['states'].shape[1:])} chains, expected {self.shape}")
        self.states = state["states"].clone()
        self.steps = state["steps"].clone()
        self.init = state["init"]
