"""The binomial statistics of attack records: 95% Wilson intervals, the two-sided sign test, and whether an
evaluation has converged (the chains' votes, the attack's steps, the EOT gradient's noise)."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (scipy's); (nan, nan) for an empty sample."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


UNDECIDED_P = 0.05  # a vote whose prediction a two-sided sign test cannot tell from its rival at 95% is undecided
LATE = 0.2  # a break in the last 20% of the attack's steps says the attack had not finished


def chains_to_decide(top: int, second: int, chains: int, most: int = 1_000_000) -> int | None:
    """How many chains would decide a vote split `top` : `second` of `chains` (the same shares, rounded), by the sign
    test at 95%; None for an even split (no number of chains decides it) or beyond `most`."""
    if top <= second:
        return None
    n = chains
    while n <= most:
        a, b = round(n * top / chains), round(n * second / chains)
        if sign_test_p(a, b) < UNDECIDED_P:
            lo = n // 2  # the first decided size lies in (lo, n]: bisect
            while n - lo > 1:
                mid = (lo + n) // 2
                if sign_test_p(round(mid * top / chains), round(mid * second / chains)) < UNDECIDED_P:
                    n = mid
                else:
                    lo = mid
            return n
        n *= 2
    return None


def gradient_convergence(cosines: list, chains: int, target: float = 0.9) -> dict | None:
    """The cosine similarity of two independent EOT gradient estimates of the same point (median over the checked
    images, at the clean and at the adversarial image), and the chains per estimate at which it would reach
    `target`: an average of n chains' gradients, mean g and per-chain noise of variance s2, has an expected
    cosine r n / (r n + 1) with r = |g|^2 / s2, so the measured c at n chains gives r and then n = t / ((1 - t) r).
    None when no image was checked."""
    known = lambda v: v is not None and v == v  # noqa: E731 - None (NaN in old files): not checked
    pairs = [c for c in cosines if c is not None and (known(c[0]) or known(c[1]))]
    clean = [c[0] for c in pairs if known(c[0])]
    adv = [c[1] for c in pairs if known(c[1])]
    if not clean and not adv:
        return None
    c = float(np.median(clean + adv))
    needed = 1 if c >= 1 else None if c <= 0 else max(1, math.ceil(target / (1 - target) * chains * (1 - c) / c - 1e-9))
    return {"images": len(pairs), "chains": chains, "cosine_median": c,
            "cosine_median_clean": float(np.median(clean)) if clean else None,
            "cosine_median_adversarial": float(np.median(adv)) if adv else None,
            f"chains_for_{target:g}": needed}


def decision_counts(votes) -> tuple[int, int] | None:
    """(chains for a judgement's prediction, chains for its rival) from a record's vote counts (`vote_counts`:
    prediction, label, strongest other class): the rival is the label where the prediction is wrong (its count
    differs from the prediction's), else the strongest other class. Records written before hold the two largest
    counts, whatever their classes, and are read as such. None where no chain voted."""
    if votes is None or votes[0] is None or votes[0] < 0:
        return None
    if len(votes) == 2:
        return votes[0], votes[1]
    return votes[0], votes[1] if votes[1] != votes[0] else votes[2]


def convergence(natural_votes: list, final_votes: list, broken_at: list[int], points: int, chains: int) -> dict:
    """Has the evaluation converged? The defense's vote: the share of clean images whose defended prediction (the
    argmax of the averaged output) the chains do not decide at 95% (sign test between the chains voting for it and
    for its rival, `decision_counts`; a rival with as many chains or more is undecided) and how many chains would
    decide them all; the same for the breaks' confirmations. The attack's steps: the last point that broke an image
    and how many broke in the last 20% of the steps (then: increase attack.steps)."""
    def votes(rows, images):
        known = [c for c in (decision_counts(v) for v, keep in zip(rows, images) if keep) if c is not None]
        undecided = [(a, b) for a, b in known if a <= b or sign_test_p(a, b) >= UNDECIDED_P]
        needed = [chains_to_decide(a, b, a + b if a + b else 1) for a, b in undecided]
        return {"images": len(known), "undecided": len(undecided),
                "undecided_share": len(undecided) / len(known) if known else None,
                "chains_to_decide_all": None if None in needed else max(
                    (round(n * chains / max(a + b, 1)) for n, (a, b) in zip(needed, undecided)), default=chains)}
    attack_breaks = [p for p in broken_at if p > 0]
    steps = points - 2  # point t + 1 is iterate t, reached after step t: the last 20% of the steps end at points
    late_from = 2 + math.floor((1 - LATE) * steps) if steps > 0 else points  # from here to the last one
    late = sum(1 for p in attack_breaks if p >= late_from)
    return {"chains": chains, "natural_vote": votes(natural_votes, [True] * len(broken_at)),
            "break_confirmation": votes(final_votes, [p > 0 for p in broken_at]),
            "last_break_point": max(attack_breaks, default=None), "late_breaks": late,
            "late_from_point": late_from, "increase_steps": late > 0}


def sign_test_p(a_only: int, b_only: int) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) on the discordant pairs: the chance of a split at least
    this uneven if neither run breaks more images than the other; 1 when there is none."""
    n = a_only + b_only
    return 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
