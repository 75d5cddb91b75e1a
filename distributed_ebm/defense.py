"""The defense: purify each input with a long Langevin chain, classify, average over replicates (EOT).

Replicate chains of an image are folded into the batch dimension and processed in chunks of at
most `chunk_size` chains, so memory stays bounded whatever the number of replicates. Chains are
keyed (`ChainKeys`), so chunking and batching never change the result.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .exact_chain import differentiable_langevin
from .langevin import langevin, prepare_energy
from .noise import ChainKeys

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (aggregated logits N x C, labels N) -> per-image N


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3).

    Invariant to shifting and scaling the logits, so it also works on log-mean-softmax outputs.
    """
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return -(z_y - others) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, Loss] = {"ce": cross_entropy, "dlr": dlr}


class Purifier:
    """T(x): `steps` Langevin steps of `ebm` started at the input itself (paper: 1500, s = 1, sigma = 0.01)."""

    def __init__(self, ebm: nn.Module | None, steps: int = 1500, step_size: float = 1.0, noise: float = 0.01):
        self.ebm = prepare_energy(ebm.eval()) if ebm is not None else None
        self.steps, self.step_size, self.noise = steps, step_size, noise

    def __call__(self, x: torch.Tensor, keys: ChainKeys) -> torch.Tensor:
        return langevin(self.ebm, x, keys, self.steps, self.step_size, self.noise)

    @property
    def is_identity(self) -> bool:
        return self.steps == 0 or (self.noise == 0 and (self.ebm is None or self.step_size == 0))


class EOTDefense:
    """Classifier behind a purifier, its outputs averaged over `replicates` independent chains.

    average="logits": mean of the replicates' logits; "softmax": log of the mean of their
    softmaxes. Either way the result is a logits-like N x C tensor whose argmax is the prediction.
    """

    def __init__(self, classifier: nn.Module, purifier: Purifier, chunk_size: int = 1024, average: str = "logits"):
        if average not in ("logits", "softmax"):
            raise ValueError(f"average must be 'logits' or 'softmax' (got {average!r})")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 (got {chunk_size})")
        self.classifier, self.purifier = classifier.eval(), purifier
        self.chunk_size, self.average = chunk_size, average

    def _per_replicate(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.average == "logits" else z.softmax(dim=1)

    def _aggregate(self, mean: torch.Tensor) -> torch.Tensor:
        return mean if self.average == "logits" else mean.log()

    def _purified_chunks(self, x, ids, seed, call, replicates):
        """Yield (chain numbers, image row of each chain, purified chains), `chunk_size` chains at a time."""
        keys = ChainKeys.replicated(seed, ids, replicates, call)
        total = x.shape[0] * replicates
        for start in range(0, total, self.chunk_size):
            rows = torch.arange(start, min(start + self.chunk_size, total))
            owner = rows // replicates
            yield rows, owner, self.purifier(x[owner], keys[rows])

    def _mean_outputs(self, chunks, n: int) -> torch.Tensor:
        mean = None
        for _, owner, xp in chunks:
            with torch.no_grad():
                out = self._per_replicate(self.classifier(xp))
            if mean is None:
                mean = torch.zeros(n, out.shape[1], dtype=out.dtype, device=out.device)
            mean.index_add_(0, owner.to(out.device), out)
        return mean

    def logits(self, x: torch.Tensor, ids: torch.Tensor, *, seed: int, call: int, replicates: int) -> torch.Tensor:
        """EOT-averaged logits of N images: N x C."""
        return self._aggregate(self._mean_outputs(self._purified_chunks(x, ids, seed, call, replicates), x.shape[0]) / replicates)

    def logits_and_grad(self, x: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, *, seed: int, call: int,
                        replicates: int, loss: Loss = cross_entropy, exact: bool = False,
                        segment: int | None = None, surrogate_temperature: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """EOT-averaged logits and the gradient of loss(averaged logits) with respect to x.

        BPDA (exact=False) takes the purifier's Jacobian as the identity: the gradient is the sum
        over replicates of the loss gradient at each purified image (no graph through the chain).
        exact=True back-propagates through every Langevin step of every replicate, with the same
        keyed noise, checkpointed every `segment` steps (`exact_chain`); surrogate_temperature T
        differentiates each step through the EBM's smooth surrogate (`EBM.smooth_surrogate`: LeakyReLU
        becomes b x + (1 - b) T softplus(x / T); a smooth EBM has none and is unchanged). Two passes per chunk
        (outputs, then vector-Jacobian products), so memory stays bounded by `chunk_size` chains.
        """
        chunks = list(self._purified_chunks(x, ids, seed, call, replicates))
        mean = self._mean_outputs(chunks, x.shape[0]) / replicates
        with torch.enable_grad():
            m = mean.detach().requires_grad_(True)
            (g_mean,) = torch.autograd.grad(loss(self._aggregate(m), labels).sum(), m)
        grad = torch.zeros_like(x)
        p = self.purifier
        through_chain = exact and not p.is_identity and p.ebm is not None and p.step_size != 0
        keys = ChainKeys.replicated(seed, ids, replicates, call) if through_chain else None
        smooth = p.ebm.smooth_surrogate(surrogate_temperature) if through_chain and surrogate_temperature else None
        with torch.enable_grad():
            for rows, owner, xp in chunks:
                if through_chain:  # the noise-only chain's Jacobian is the identity: BPDA is exact there
                    x0 = x[owner].detach().requires_grad_(True)
                    xp = differentiable_langevin(p.ebm, x0, keys[rows], p.steps, p.step_size, p.noise, segment, smooth)
                else:
                    x0 = xp = xp.detach().requires_grad_(True)
                surrogate = (self._per_replicate(self.classifier(xp)) * g_mean[owner]).sum() / replicates
                (g,) = torch.autograd.grad(surrogate, x0)
                grad.index_add_(0, owner.to(grad.device), g.to(grad.dtype).contiguous())
        return self._aggregate(mean), grad
