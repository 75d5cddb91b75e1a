"""The attack modes (`attack.mode`): one small class each, and MODES, the table everything reads.

A mode says three things: what the attack differentiates (`gradient`: the undefended classifier,
or the defense's EOT average through BPDA or through every Langevin step), who judges an image
(`defended`: the defense, with its check and confirmation chains, else the classifier itself) and
at which evaluation points (`checked`). The protocol (random start, iterates, breaks, records,
costs, re-evaluation) is `attacks.engine.Attack`'s alone, the same for every mode, and how an
iterate moves (fixed-step PGD or APGD, `attack.optimizer`) is `attacks.apgd`'s.

Config validation (config/), the engine, the chunk default (local/attack.py) and the report's labels
all read MODES, so a new attack is a subclass here and its line in MODES (and a pinned case in
tests/test_attack_modes.py). This module imports nothing: the engine imports it, not the other way round.

A mode runs inside one `Attack`, `self.attack`, and calls only its model handles:
`classifier(x)`, `classifier_gradient(x, labels)` and `eot(x, rows, call, replicates, labels, ...)`
(which charges the chains to the images' cost). Calls are keyed as the engine's module doc says.
"""
from __future__ import annotations

from typing import ClassVar


class Mode:
    """The interface. `gradient` returns (logits of what is attacked, ascent gradient) at an iterate;
    `output` the same logits at the last iterate, where no gradient is taken."""

    name: ClassVar[str]
    label: ClassVar[str]  # debm report's description: a format string over report.attack_label's parts
    defended: ClassVar[bool] = True  # through the purifier: the defense judges (check, then confirmation)
    moves: ClassVar[bool] = True  # takes PGD steps (False: only the clean image is judged)
    exact: ClassVar[bool] = False  # differentiates through the chain: memory grows with it; attack.surrogate applies
    check_from_gradient: ClassVar[bool] = True  # an iterate's check reuses the logits of its gradient pass

    def __init__(self, attack):  # the engine's `Attack` (not imported: it imports this table)
        self.attack, self.s = attack, attack.s

    def checked(self, point: int, points: int) -> bool:
        return True

    def gradient(self, x, labels, rows, point: int):
        raise NotImplementedError(f"mode {self.name} takes no gradient")

    def output(self, x, rows, point: int):
        return None


class PGD(Mode):
    """Plain PGD on the undefended classifier, which also judges (deterministic: no confirmation)."""

    name, label, defended = "pgd", "{optimizer} {budget}, {steps} steps", False

    def gradient(self, x, labels, rows, point):
        return self.attack.classifier_gradient(x, labels)

    def output(self, x, rows, point):
        return self.attack.classifier(x)


class BPDAEOT(Mode):
    """The paper's attack: EOT over `eot_attack` purified replicates, identity Jacobian through the purifier."""

    name, label = "bpda_eot", "BPDA+EOT{extra} {budget}, {steps} steps, {chains}"

    def gradient(self, x, labels, rows, point):
        return self.attack.eot(x, rows, 2 * point, self.s.eot_attack, labels)

    def output(self, x, rows, point):
        return self.attack.eot(x, rows, 2 * point, self.s.eot_attack)


class ExactEOT(BPDAEOT):
    """As BPDA+EOT, but the gradient goes through every Langevin step of every replicate (exact_chain);
    `surrogate` differentiates each step through a smooth stand-in for a piecewise-linear EBM."""

    name, exact = "exact_eot", True
    label = "{kink}exact-gradient EOT{extra} {budget}, {steps} steps, {chains}"

    def gradient(self, x, labels, rows, point):
        ebm = self.attack.defense.purifier.ebm
        kinked = self.s.surrogate and getattr(ebm, "piecewise_linear", False)
        # each chain runs three times (outputs, forward, recomputation); the kink-aware recomputation runs both energies
        return self.attack.eot(x, rows, 2 * point, self.s.eot_attack, labels, exact=True, runs=4 if kinked else 3)


class Transfer(Mode):
    """PGD on the undefended classifier; the defense judges the clean image and the last iterate."""

    name, label, check_from_gradient = "transfer", "transfer {optimizer} {budget}, {steps} steps", False

    def checked(self, point, points):
        return point in (0, points - 1)

    def gradient(self, x, labels, rows, point):
        return self.attack.classifier_gradient(x, labels)


class Defense(Mode):
    """No attack: the defense judges the clean image (the defended classifier's natural accuracy)."""

    name, label, moves = "defense", "none (natural only)", False


MODES: dict[str, type[Mode]] = {m.name: m for m in (BPDAEOT, ExactEOT, PGD, Transfer, Defense)}
