"""The attack job's config: the defense, the attack and how it is counted (the paper's section 'The attack')."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from ..method.attacks import MODES, NORMS, UPDATERS
from ..method.defense import LOSSES
from ..method.nets.formats import format_names
from .common import (
    URL,
    Budget,
    ClassifierConfig,
    DataConfig,
    EBMNetConfig,
    LangevinConfig,
    MLflowConfig,
    Output,
    Precision,
    RayConfig,
    Section,
    Seed,
)
from .load import validation_message


class PurifyConfig(LangevinConfig):
    """The purifier's chain: LangevinConfig's steps, plus an initial kick x <- x + init_noise * xi."""

    init_noise: float = Field(0.0, ge=0.0, le=10.0, description="sd of one Gaussian kick added to the input before "
                              "the first step (0 = none: the paper's; MEFA 0.015, JEM 0.03); keyed like the steps")


def _purify(value: Any) -> Any:
    """A plain LangevinConfig (as Python callers build one) is taken as a PurifyConfig without a kick."""
    return value.model_dump() if isinstance(value, LangevinConfig) and not isinstance(value, PurifyConfig) else value

class AttackSettings(Section):
    """How the defense is attacked and counted."""

    mode: Literal[tuple(MODES)] = Field("bpda_eot",
                                        description="what is attacked and who judges (method/attacks/modes.py, one "
                                                    "class per mode): bpda_eot, exact_eot (the gradient through every "
                                                    "Langevin step), pgd (the undefended classifier), transfer (PGD on "
                                                    "the classifier, the defense judges the last iterate), defense "
                                                    "(natural accuracy only)")
    optimizer: Literal[tuple(UPDATERS)] = Field("pgd", description="pgd: fixed steps of step_size; apgd: Auto-PGD's "
                                              "schedule (step 2 eps, halved per image on stagnation with a reset to "
                                              "its best point, momentum 0.75; step_size unused). Both work with every "
                                              "mode, on the EOT-averaged output for the defended ones")
    loss: Literal[tuple(LOSSES)] = Field("ce",
                                         description="the loss the attack ascends: cross-entropy, or the "
                                                     "difference-of-logits ratio (dlr), of the (EOT-averaged) output")
    norm: Literal[tuple(NORMS)] = Field("linf", description="the threat model: L-inf or L2 ball of radius eps")
    eps: Budget = Field(8 / 255, ge=0.0, le=1.0, description="radius in [0, 1] pixel units")
    step_size: Budget = Field(2 / 255, gt=0.0, le=1.0, description="in [0, 1] pixel units")
    steps: int = Field(50, ge=0, le=100_000, description="PGD iterations; the evaluation points are the clean "
                       "image and iterates 0 (the random start) to steps, steps + 2 in all")
    random_start: bool = Field(True,
                               description="start PGD at a uniform random point of the ball (keyed by seed and image "
                                           "id)")
    eot_attack: int = Field(15, ge=1, le=100_000, description="purified replicates (chains) per gradient and per check")
    eot_defense: int = Field(150, ge=0, le=100_000, description="fresh chains that confirm a break and vote on the "
                             "clean image; 0 = no confirmation")
    average: Literal["logits", "softmax"] = Field("logits", description="how the EOT replicates' outputs are averaged")
    segment: Optional[int] = Field(None, ge=1, le=100_000, description="exact_eot: Langevin steps per "
                                   "checkpointed segment; null = round(sqrt(purify.steps)). Memory: K / segment "
                                   "stored states plus one segment's graph, so it grows with sqrt(K)")
    reevaluations: int = Field(0, ge=0, le=10_000, description="judge each record's adversarial image (the break's "
                               "iterate, else the most adversarial checked one) this many more times with fresh "
                               "eot_defense-chain votes: mean and worst case. Not with ensemble or restarts")
    surrogate: Optional[Literal["softplus"]] = Field(None, description="exact_eot: keep the chain exact but "
                                                     "differentiate each step through a smooth stand-in for a "
                                                     "piecewise-linear activation (smooth ones are left as they are)")
    surrogate_temperature: float = Field(0.01, gt=0.0, le=100.0, description="T of b x + (1 - b) T softplus(x / T)")
    ensemble: Optional[list[dict[str, Any]]] = Field(None, description="worst case over attacks: each entry "
                                                     "overrides these settings, e.g. [{mode: bpda_eot}, {optimizer: "
                                                     "apgd, loss: dlr}]; an image is attacked by each in turn until "
                                                     "one breaks it, and is robust only if it survives all. Records "
                                                     "add broken_by")
    restarts: int = Field(1, ge=1, le=1000, description="random starts per attack (each member of an ensemble: "
                          "member 0's, then member 1's, ...), each with keys of its own; an image is robust only if "
                          "it survives every one. Records add broken_restart")
    ensemble_keys: Literal["independent", "paired"] = Field(
        "independent", description="independent: member k's restart r draws its start, chains and confirmations "
        "from noise.stream_seed(seed, k, r) (member 0's restart 0: the run seed); paired: every member uses member "
        "0's streams, so a member gives exactly its records alone (paired comparisons)")

    @model_validator(mode="after")
    def _consistent(self):
        mode = MODES[self.mode]
        if self.reevaluations and not mode.defended:
            raise ValueError(f"attack.reevaluations needs a defended mode: the undefended classifier "
                             f"(mode {self.mode}) is deterministic")
        if self.ensemble is not None:
            self.members()  # each member must be a valid attack on its own
            if self.reevaluations:
                raise ValueError("attack.reevaluations is not supported with attack.ensemble")
        if self.restarts > 1:
            if self.ensemble is None and not mode.moves:
                raise ValueError(f"attack.restarts = {self.restarts}: mode {self.mode} does not attack (restarts = 1)")
            if self.reevaluations:
                raise ValueError("attack.reevaluations is not supported with attack.restarts > 1")
        if self.surrogate and not mode.exact:
            exact = " or ".join(m.name for m in MODES.values() if m.exact)
            raise ValueError(f"attack.surrogate differentiates through the chain: it needs attack.mode={exact} "
                             f"(got {self.mode})")
        if self.reevaluations and self.eot_defense == 0:
            raise ValueError("attack.reevaluations judges with attack.eot_defense chains: set eot_defense >= 1")
        return self

    @property
    def name(self) -> str:
        """What progress lines and run names call this attack: its mode, or `ensemble`."""
        return self.mode if self.ensemble is None else "ensemble"

    @property
    def worst_case(self) -> bool:
        """Whether more than one run attacks each image (an ensemble, or restarts): records name the breaker."""
        return self.ensemble is not None or self.restarts > 1

    def members(self) -> list["AttackSettings"]:
        """The ensemble's attacks (these settings with each entry's overrides), or [self]."""
        if self.ensemble is None:
            return [self]
        if not self.ensemble:
            raise ValueError("attack.ensemble is empty: list at least one attack")
        base = self.model_dump(exclude={"ensemble"})
        out = []
        for k, entry in enumerate(self.ensemble):
            bad = {"ensemble", "reevaluations", "restarts", "ensemble_keys"} & set(entry)
            if bad:
                raise ValueError(f"attack.ensemble[{k}]: {', '.join(sorted(bad))} cannot be set per attack")
            try:
                member = AttackSettings.model_validate({**base, **entry})
            except ValidationError as err:
                raise ValueError(f"attack.ensemble[{k}]: {validation_message(err)}") from None
            if not MODES[member.mode].moves:
                raise ValueError(f"attack.ensemble[{k}]: mode {member.mode} does not attack")
            out.append(member)
        if len({MODES[m.mode].defended for m in out}) > 1:
            undefended = " or ".join(m.name for m in MODES.values() if not m.defended)
            raise ValueError(f"attack.ensemble mixes the undefended classifier (mode {undefended}) with defended modes")
        return out

    @property
    def defended(self) -> bool:
        """Whether any attack runs through the purifier (every mode but pgd)."""
        return any(MODES[m.mode].defended for m in self.members())


class ReportConfig(Section):
    """What an attack run shows besides its figures: a gallery, and the EOT gradient's convergence."""

    gallery: int = Field(8, ge=0, le=1000, description="the first N images of the run (by id) drawn in gallery.png: "
                         "clean, adversarial, perturbation, a purified chain of each, with predictions and vote shares "
                         "(0 = none)")
    gradient_check: int = Field(0, ge=0, le=10_000, description="the first N images of the run (by id) whose EOT "
                                "gradient is estimated twice more, with independent chains, at the clean and at the "
                                "adversarial image: their cosine similarity says whether eot_attack chains suffice "
                                "(costs 4 gradients of eot_attack chains per image; 0 = off, as in the paper configs)")


class AttackConfig(Section):
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    classifier: ClassifierConfig = Field(default_factory=lambda: ClassifierConfig())
    ebm: Optional[URL] = Field(None, description="EBM checkpoint URL (needed by every mode but pgd)")
    ebm_format: Literal[("auto", *format_names("ebm"))] = Field(
        "auto", description="how ebm is read (method/nets/formats.py FORMATS): auto (as its content says: a project "
        "checkpoint, a JEM checkpoint or a .pt2 program; refuses the bare f.* state dicts, which are "
        "stochastic_security or mefa alike), debm, stochastic_security, mefa (with ebm_net.activation soft_lrelu or "
        "silu), jem, export")
    ebm_net: EBMNetConfig = Field(default_factory=lambda: EBMNetConfig())
    purify: Annotated[PurifyConfig, BeforeValidator(_purify)] = Field(default_factory=lambda: PurifyConfig(steps=1500))
    attack: AttackSettings = Field(default_factory=lambda: AttackSettings())
    batch_size: int = Field(10, ge=1, le=1_000_000, description="images per attack batch (one record part each)")
    chunk_size: Optional[int] = Field(None, ge=1, le=10_000_000, description="most chains per forward pass; "
                                      "null = 1024, except for a defended attack on CUDA without exact_eot: as many "
                                      "as fit 40% of the free memory (from a measured per-chain footprint)")
    precision: Precision = "float32"
    seed: Seed = 0
    output: Output = "runs/attack"
    report: ReportConfig = Field(default_factory=lambda: ReportConfig())
    ray: RayConfig = Field(default_factory=lambda: RayConfig())
    mlflow: MLflowConfig = Field(default_factory=lambda: MLflowConfig())

    @model_validator(mode="after")
    def _needs_ebm(self):
        if self.attack.defended and self.ebm is None and self.purify.step_size > 0:
            raise ValueError(f"attack.mode={self.attack.mode} purifies with an EBM: set ebm to a checkpoint URL "
                             "(or purify.step_size=0 for noise-only chains)")
        if self.ebm_format == "mefa" and self.ebm_net.activation not in ("soft_lrelu", "silu"):
            raise ValueError("ebm_format=mefa: set ebm_net.activation to soft_lrelu or silu (MEFA's files have the "
                             "keys of the paper's LeakyReLU network: the activation is never guessed)")
        if self.classifier.format == "stochastic_security" and self.classifier.arch not in ("wrn28_10_ss", "wrn_ss"):
            raise ValueError(f"classifier.format=stochastic_security holds the authors' WRN: set classifier.arch to "
                             f"wrn28_10_ss or wrn_ss (got {self.classifier.arch})")
        if self.attack.loss == "dlr" and self.classifier.num_classes < 3:
            raise ValueError(f"attack.loss=dlr needs at least 3 classes (classifier.num_classes="
                             f"{self.classifier.num_classes})")
        return self
