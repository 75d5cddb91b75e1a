"""The defense: purify each input with a long Langevin chain, classify, average over replicates (EOT).

Replicate chains of an image are folded into the batch dimension (image-major: chain k is
replicate k % R of image k // R) and processed in chunks of at most `chunk_size` chains; each
chunk's outputs are added into running per-image sums and dropped, so the work's memory is
bounded by `chunk_size` chains whatever the number of replicates R. (A gradient also keeps the purified
images, R per image, between its two passes.) Chains are keyed (`ChainKeys`),
and each image's sum adds its replicates one by one in replicate order, with no scatter or atomic
add, so chunking and batching never change the sum and it is deterministic on CUDA as on the CPU.

Devices: x, labels and ids share one device (the images'); results are on it too.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .exact_chain import chain_digest, differentiable_langevin
from .langevin import langevin, prepare_energy
from .noise import ChainKeys

KICK_STEP = 0xFFFFFFFF  # the step number of the initial kick's noise (chains run far fewer steps)
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
    """T(x): `steps` Langevin steps of `ebm` started at the input itself (paper: 1500, s = 1, sigma = 0.01).

    amp: autocast dtype of the EBM's forward and backward (torch.bfloat16 for `precision: bf16`);
    the chains stay in the input's dtype.
    """

    def __init__(self, ebm: nn.Module | None, steps: int = 1500, step_size: float = 1.0, noise: float = 0.01,
                 amp: torch.dtype | None = None, init_noise: float = 0.0):
        self.ebm = prepare_energy(ebm.eval()) if ebm is not None else None
        self.steps, self.step_size, self.noise, self.amp = steps, step_size, noise, amp
        self.init_noise = init_noise

    def kick(self, x: torch.Tensor, keys: ChainKeys) -> torch.Tensor:
        """x + init_noise * xi before the first step (MEFA's and JEM's chains start so; the paper's does not),
        xi keyed by the chain at step KICK_STEP; x itself when init_noise is 0."""
        if not self.init_noise:
            return x
        n, c, h, w = x.shape
        xi = keys.normal(KICK_STEP, (h, w, c), device=x.device, dtype=x.dtype).permute(0, 3, 1, 2)
        return x + self.init_noise * xi

    def __call__(self, x: torch.Tensor, keys: ChainKeys) -> torch.Tensor:
        return langevin(self.ebm, self.kick(x, keys), keys, self.steps, self.step_size, self.noise, amp=self.amp)

    @property
    def is_identity(self) -> bool:
        still = self.steps == 0 or (self.noise == 0 and (self.ebm is None or self.step_size == 0))
        return still and not self.init_noise


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

    def _chunks(self, n: int, replicates: int):
        """(first chain, end chain) of each chunk of the n * replicates chains."""
        total = n * replicates
        return [(a, min(a + self.chunk_size, total)) for a in range(0, total, self.chunk_size)]

    def _purified_chunks(self, x, ids, seed, call, replicates):
        """Yield (first chain, purified chains), `chunk_size` chains at a time."""
        keys = ChainKeys.replicated(seed, ids, replicates, call)
        for a, b in self._chunks(x.shape[0], replicates):
            yield a, self.purifier(_rows(x, a, b, replicates), keys[a:b])

    def _mean_outputs(self, chunks, n: int, replicates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over replicates of the per-replicate outputs, folded in replicate order, and the chains' votes:
        N x C counts of the chains whose own prediction is each class."""
        total = votes = None
        for a, xp in chunks:
            with torch.no_grad():
                out = self._per_replicate(self.classifier(xp))
            if total is None:
                total = out.new_zeros(n, out.shape[1])
                votes = torch.zeros(n, out.shape[1], dtype=torch.int64, device=out.device)
            fold_replicates(total, out, a, replicates)
            fold_replicates(votes, torch.nn.functional.one_hot(out.argmax(1), out.shape[1]), a, replicates)
        return total / replicates, votes

    def logits(self, x: torch.Tensor, ids: torch.Tensor, *, seed: int, call: int, replicates: int,
               votes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """EOT-averaged logits of N images: N x C (and, with `votes`, the N x C counts of the chains' own votes)."""
        same_device(x=x, ids=ids)
        mean, counts = self._mean_outputs(self._purified_chunks(x, ids, seed, call, replicates), x.shape[0], replicates)
        return (self._aggregate(mean), counts) if votes else self._aggregate(mean)

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
        becomes b x + (1 - b) T softplus(x / T); a smooth EBM has none and is unchanged). Two passes
        over the chunks (outputs, then vector-Jacobian products). BPDA keeps the purified images between the passes
        (R images per image) and starts its second pass from them; the exact one keeps only their digests
        (`chain_digest`), runs each chunk's chains again and checks them against the judged chains bit for bit
        (`ChainMismatch`), so its memory stays bounded by `chunk_size` chains.
        """
        same_device(x=x, labels=labels, ids=ids)
        p = self.purifier
        through_chain = exact and not p.is_identity and p.ebm is not None and p.step_size != 0
        # kept for the second pass: BPDA starts from the purified images, the exact gradient checks its chains
        # against their digests
        judged = []
        chunks = self._purified_chunks(x, ids, seed, call, replicates)
        chunks = _digested(chunks, judged) if through_chain else list(chunks)
        mean, _ = self._mean_outputs(chunks, x.shape[0], replicates)
        with torch.enable_grad():
            m = mean.detach().requires_grad_(True)
            (g_mean,) = torch.autograd.grad(loss(self._aggregate(m), labels).sum(), m)
        grad = torch.zeros_like(x)
        surrogate_of = getattr(p.ebm, "smooth_surrogate", None)  # the convnet EBM's; other networks have none
        smooth = (surrogate_of(surrogate_temperature) if through_chain and surrogate_temperature and surrogate_of
                  else None)
        if through_chain:  # run each chunk's chains again, now differentiably
            keys = ChainKeys.replicated(seed, ids, replicates, call)
            chunks = ((a, _rows(x, a, a + len(digest), replicates), keys[a:a + len(digest)], digest)
                      for a, digest in judged)
        else:  # the noise-only chain's Jacobian is the identity: BPDA is exact there
            chunks = ((a, xp, None, None) for a, xp in chunks)
        with torch.enable_grad():
            for a, x0, chunk_keys, judged in chunks:
                x0 = x0.detach().requires_grad_(True)
                xp = (differentiable_langevin(p.ebm, p.kick(x0, chunk_keys), chunk_keys, p.steps, p.step_size, p.noise,
                                              segment, smooth, p.amp, judged=judged)
                      if through_chain else x0)
                v = _rows(g_mean, a, a + x0.shape[0], replicates)
                surrogate = (self._per_replicate(self.classifier(xp)) * v).sum() / replicates
                (g,) = torch.autograd.grad(surrogate, x0)
                fold_replicates(grad, g.to(grad.dtype), a, replicates)
        return self._aggregate(mean), grad


def _digested(chunks, digests: list):
    """Pass (first chain, purified chains) on, keeping (first chain, their `chain_digest`) in `digests`."""
    for a, xp in chunks:
        digests.append((a, chain_digest(xp)))
        yield a, xp


def same_device(**tensors: torch.Tensor) -> None:
    """The device rule of the defense and the attack engine: every per-image tensor (images,
    labels, ids, masks, row numbers) lives on the images' device. Raises naming the odd one out."""
    named = list(tensors.items())
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} on {first.device}: "
                             "per-image tensors must share the images' device")


def _rows(x: torch.Tensor, a: int, b: int, replicates: int) -> torch.Tensor:
    """The image of each of chains a..b-1 (x.repeat_interleave(replicates)[a:b], without the rest)."""
    return x[torch.arange(a, b, device=x.device) // replicates]


def fold_replicates(total: torch.Tensor, values: torch.Tensor, a: int, replicates: int) -> None:
    """total[k // R] += values[k - a] for chains k = a, a + 1, ..., one replicate number at a time.

    Each image's sum is ((v_0 + v_1) + v_2) + ... in replicate order whatever the chunk boundaries,
    and no atomic or scattered add is used, so the result is deterministic on CUDA and equal to a
    sequential `index_add_` on the CPU. Strided views: no copy of the chunk.
    """
    b = a + values.shape[0]
    for r in range(replicates):
        k = a + (r - a) % replicates  # the chunk's first chain with replicate number r
        if k < b:
            rows = values[k - a::replicates]
            total[k // replicates:k // replicates + rows.shape[0]] += rows
