"""Typed job configs: YAML files plus dotted `key=value` overrides, validated before any work.

Every number of the paper is a default here, never a constant in the code. A bad value fails
with one line that names the key and the allowed range (`ConfigError`), before anything runs.
Files and overrides are read and merged by OmegaConf (interpolation: `${other.key}`, and
`${oc.env:VAR}` / `${oc.env:VAR,default}` from the environment); pydantic validates the result.
OmegaConf is imported only by `load_config`, so the method core imports without it.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..method.attacks.modes import MODES


class InputError(ValueError):
    """Bad input from a user (config, data, checkpoint): the message says what and where."""


class JobFailed(RuntimeError):
    """A job that cannot go on for a reason outside its input (e.g. lost capacity): one line, exit 1."""


def exit_status(prog: str, job: Callable[[], int | None]) -> int:
    """Run a job's body and turn the failures users cause or meet into one line and an exit code:
    bad input 2, a job that cannot go on 1 (anything else keeps its traceback). Every entry point uses it."""
    try:
        return job() or 0
    except (InputError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1


class ConfigError(InputError):
    """A config that cannot run; the message is one line naming the key."""


def _fraction(value: Any) -> Any:
    """Accept budgets written as in papers: "8/255"."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9.eE+-]+\s*/\s*[0-9.eE+-]+\s*", value):
        num, den = value.split("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return value
    return value


def _expand(value: Any) -> Any:
    """A local relative path becomes absolute (from the working directory now), so Ray workers,
    actors and Tune trials, whose working directories differ, find the same file."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value
    return value if "://" in value or not value else os.path.abspath(value)


def shared(path: str) -> str:
    """A file of the shared data and weights: under $DEBM_SHARED, else ../shared."""
    return f"{os.environ.get('DEBM_SHARED', '../shared')}/{path}"


Budget = Annotated[float, BeforeValidator(_fraction)]
URL = Annotated[str, BeforeValidator(_expand)]
"""A local path (made absolute) or fsspec URL (s3://...)."""


class Section(BaseModel):
    # strict: `true` is not the integer 1, "3" is not a number; nan and inf are never a setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, strict=True,
                              allow_inf_nan=False)


# --- building blocks -------------------------------------------------------------------------

class DataConfig(Section):
    """Where images come from and which of them to use."""

    format: Literal["parquet", "torchvision"] = "parquet"
    path: URL = Field(default_factory=lambda: shared("datasets/cifar10/test-exact-1000.parquet"),
                      description="parquet URL (local or s3://), or a torchvision root folder")
    name: Literal["cifar10", "cifar100", "svhn"] = "cifar10"
    split: Literal["train", "test"] = "test"
    download: bool = False
    image_size: int = Field(32, ge=8, le=1024)
    count: Optional[int] = Field(None, ge=1, description="the first `count` images")
    indices: Optional[list[Annotated[int, Field(ge=0)]]] = Field(None, description="these dataset ids")
    random: Optional[int] = Field(None, ge=1, description="a seeded random subset of this size")
    subset_seed: int = Field(0, ge=0)
    exclude: Optional[list[Annotated[int, Field(ge=0)]]] = Field(None, description="ids held out (before the subset)")
    id_range: Optional[list[Annotated[int, Field(ge=0)]]] = Field(None, min_length=2, max_length=2, description=
                                                                  "[low, high): only images with these ids (before the subset)")

    @model_validator(mode="after")
    def _one_subset(self):
        chosen = [k for k in ("count", "indices", "random") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose at most one of count, indices, random (got {', '.join(chosen)})")
        if self.id_range is not None and self.id_range[0] >= self.id_range[1]:
            raise ValueError(f"data.id_range = {self.id_range}: [low, high) needs low < high")
        if self.indices is not None and not self.indices:
            raise ValueError("indices is empty: the subset would hold no image")
        if self.indices is not None and len(set(self.indices)) != len(self.indices):
            twice = sorted({i for i in self.indices if self.indices.count(i) > 1})
            raise ValueError(f"data.indices names ids {twice[:5]} more than once: list each image once")
        return self


Activation = Literal["lrelu", "soft_lrelu", "silu"]


class EBMConfig(Section):
    width: int = Field(32, ge=1, le=1024, description="channels of the first conv (paper: 32)")
    image_size: int = Field(32, ge=8, le=1024)
    channels: int = Field(3, ge=1, le=16)
    activation: Activation = Field("lrelu", description="lrelu: the paper's LeakyReLU(0.05); soft_lrelu: MEFA's "
                                   "(1 - a) x + a sqrt(x^2 + e^2) - a e; silu")
    soft_alpha: float = Field(0.49, gt=0.0, lt=0.5, description="soft_lrelu's a (left slope 1 - 2a)")
    soft_eps: float = Field(0.01, gt=0.0, le=10.0, description="soft_lrelu's e (width of the bend)")


class EBMNetConfig(Section):
    """What an attack expects of its EBM checkpoint (which records its own network)."""

    activation: Optional[Activation] = Field(None, description="null = the checkpoint's; set = must be the checkpoint's")
    soft_alpha: float = Field(0.49, gt=0.0, lt=0.5)
    soft_eps: float = Field(0.01, gt=0.0, le=10.0)


class LangevinConfig(Section):
    """x <- x - step_size * grad f(x) + noise * xi."""

    steps: int = Field(100, ge=0, le=1_000_000)
    step_size: float = Field(1.0, ge=0.0, le=1e6)
    noise: float = Field(0.01, ge=0.0, le=10.0)


class ClassifierConfig(Section):
    arch: Literal["resnet20", "resnet32", "resnet44", "resnet56", "wrn28_10", "wrn"] = "resnet20"
    weights: Optional[URL] = Field(default_factory=lambda: shared("weights/resnet20-12fca82f.th"),
                                   description="checkpoint URL; null = random init")
    num_classes: int = Field(10, ge=2, le=100_000)
    wrn_depth: int = Field(28, ge=10, le=100, description="arch=wrn only")
    wrn_widen: int = Field(10, ge=1, le=20, description="arch=wrn only")
    mean: Optional[list[float]] = Field(None, min_length=3, max_length=3, description="input normalization; null = the arch's own")
    std: Optional[list[Annotated[float, Field(gt=0)]]] = Field(None, min_length=3, max_length=3)


class RayConfig(Section):
    """Where the Ray engine runs and what each actor asks for."""

    address: Optional[str] = Field(None, description="Ray address; null = RAY_ADDRESS, or a new local Ray")
    actors: Optional[int] = Field(None, ge=1, description="actor pool size; null = as many as the cluster holds")
    cpus_per_actor: float = Field(1.0, gt=0, le=1024)
    gpus_per_actor: Optional[float] = Field(None, ge=0, le=64, description="null = 1 when the cluster has GPUs, else 0")
    max_failures: int = Field(3, ge=0, le=1000, description="lost actors or nodes to recover from, each by running the "
                              "pipeline again on the images without a record")


class MLflowConfig(Section):
    enabled: bool = True
    tracking_uri: Optional[str] = Field(None, description="null = MLFLOW_TRACKING_URI, or sqlite:///<cwd>/runs/mlflow.db")
    experiment: str = Field("distributed-ebm", min_length=1)
    artifact_location: Optional[URL] = Field(None, description="for a new experiment; null = <cwd>/runs/mlartifacts")
    run_name: Optional[str] = None


class TrainRayConfig(Section):
    """A Ray Train run: DDP workers, their resources, failures tolerated, checkpoints kept."""

    address: Optional[str] = Field(None, description="Ray address; null = RAY_ADDRESS, or a new local Ray")
    workers: int = Field(1, ge=1, le=4096)
    use_gpu: Optional[bool] = Field(None, description="null = when the cluster has a GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    max_failures: int = Field(3, ge=-1, description="worker failures to recover from (-1 = no limit)")
    keep_checkpoints: int = Field(2, ge=1)
    startup_timeout_s: float = Field(60.0, gt=0, le=86_400, description="how long a (re)started run waits for "
                                    "its workers' resources before it fails (e.g. after losing a node)")


class EBMRayConfig(TrainRayConfig):
    bank_shards: int = Field(1, ge=1, le=4096, description="replay-buffer actors holding the bank")


# --- jobs ------------------------------------------------------------------------------------

class TrainEBMConfig(Section):
    data: DataConfig = Field(default_factory=lambda: DataConfig(path=shared("datasets/cifar10/train.parquet"), split="train"))
    ebm: EBMConfig = Field(default_factory=lambda: EBMConfig())
    langevin: LangevinConfig = Field(default_factory=lambda: LangevinConfig())
    iterations: int = Field(250_000, ge=1)
    batch_size: int = Field(100, ge=1, le=100_000)
    data_noise: float = Field(0.02, ge=0.0, le=10.0, description="sd of Gaussian noise added to positives")
    adam_lr: float = Field(1e-4, gt=0, le=1.0)
    sgd_start: int = Field(125_000, ge=0, description="iteration at which Adam is replaced by plain SGD")
    sgd_lr: float = Field(5e-5, gt=0, description="SGD lr in units of noise^2/2 (paper: 5e-5)")
    bank_size: Optional[int] = Field(None, ge=1, description="persistent chains; null = one per training image")
    bank_init: Literal["noise", "data"] = "noise"
    rejuvenation: float = Field(0.0, ge=0.0, le=1.0, description="chance a drawn chain restarts")
    seed: int = Field(0, ge=0, lt=2**32)
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(100, ge=1)
    output: URL = "runs/ebm"
    name: str = Field("ebm", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="run name: the same name and output resume the run")
    ray: EBMRayConfig = Field(default_factory=lambda: EBMRayConfig())
    mlflow: MLflowConfig = Field(default_factory=lambda: MLflowConfig())

    @model_validator(mode="after")
    def _sizes(self):
        if self.ebm.image_size != self.data.image_size:
            raise ValueError(f"ebm.image_size {self.ebm.image_size} differs from data.image_size {self.data.image_size}")
        if self.batch_size % self.ray.workers:
            raise ValueError(f"batch_size = {self.batch_size} does not split evenly over ray.workers = {self.ray.workers} "
                             "(each worker takes batch_size / ray.workers chains)")
        return self


class TrainClassifierConfig(Section):
    data: DataConfig = Field(default_factory=lambda: DataConfig(path=shared("datasets/cifar10/train.parquet"), split="train"))
    test_data: Optional[DataConfig] = Field(default_factory=lambda: DataConfig())
    classifier: ClassifierConfig = Field(default_factory=lambda: ClassifierConfig(arch="wrn28_10", weights=None))
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(100, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0, le=10.0)
    lr_milestones: list[Annotated[int, Field(ge=1)]] = [40, 60]
    lr_gamma: float = Field(0.1, gt=0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(2e-4, ge=0.0, le=1.0)
    augment: bool = True
    seed: int = Field(0, ge=0, lt=2**32)
    output: URL = "runs/classifier"
    name: str = Field("classifier", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="run name: the same name and output resume the run")
    ray: TrainRayConfig = Field(default_factory=lambda: TrainRayConfig())
    mlflow: MLflowConfig = Field(default_factory=lambda: MLflowConfig())


class AttackSettings(Section):
    """How the defense is attacked and counted (../shared/PAPER.md, 'The attack')."""

    mode: Literal[tuple(MODES)] = "bpda_eot"  # method/attacks/modes.py MODES: one class per mode
    optimizer: Literal["pgd", "apgd"] = Field("pgd", description="apgd: step size from 2 eps, halved on "
                                              "stagnation, momentum 0.75 (step_size unused)")
    loss: Literal["ce", "dlr"] = "ce"
    norm: Literal["linf", "l2"] = "linf"
    eps: Budget = Field(8 / 255, ge=0.0, le=1.0, description="radius in [0, 1] pixel units")
    step_size: Budget = Field(2 / 255, gt=0.0, le=1.0, description="in [0, 1] pixel units")
    steps: int = Field(50, ge=0, le=100_000)
    random_start: bool = True
    eot_attack: int = Field(15, ge=1, le=100_000, description="chains per gradient and check")
    eot_defense: int = Field(150, ge=0, le=100_000, description="fresh chains to confirm a break; 0 = no confirmation")
    average: Literal["logits", "softmax"] = "logits"
    segment: Optional[int] = Field(None, ge=1, le=100_000, description="exact_eot: Langevin steps per "
                                   "checkpointed segment; null = round(sqrt(purify.steps))")
    reevaluations: int = Field(0, ge=0, le=10_000, description="re-judge each final adversarial image this many "
                               "times with fresh chains (eot_defense each): mean and worst case")
    surrogate: Optional[Literal["softplus"]] = Field(None, description="exact_eot: keep the chain exact but "
                                                     "differentiate each step through a smooth stand-in for a "
                                                     "piecewise-linear activation (smooth ones are left as they are)")
    surrogate_temperature: float = Field(0.01, gt=0.0, le=100.0, description="T of b x + (1 - b) T softplus(x / T)")
    ensemble: Optional[list[dict[str, Any]]] = Field(None, description="worst case over attacks: each entry "
                                                     "overrides these settings; an image is attacked by each in turn "
                                                     "until one breaks it")
    restarts: int = Field(1, ge=1, le=1000, description="random starts per attack (each member of an ensemble), "
                          "each with keys of its own; an image is robust only if it survives every one")
    ensemble_keys: Literal["independent", "paired"] = Field(
        "independent", description="independent: each ensemble member draws its own keys; paired: every member "
        "the run seed's (restart r of each member shares restart r's), for paired comparisons of members")

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
                raise ValueError(f"attack.ensemble[{k}]: {_describe(err)}") from None
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


class AttackConfig(Section):
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    classifier: ClassifierConfig = Field(default_factory=lambda: ClassifierConfig())
    ebm: Optional[URL] = Field(None, description="EBM checkpoint URL (needed by every mode but pgd)")
    ebm_net: EBMNetConfig = Field(default_factory=lambda: EBMNetConfig())
    purify: LangevinConfig = Field(default_factory=lambda: LangevinConfig(steps=1500))
    attack: AttackSettings = Field(default_factory=lambda: AttackSettings())
    batch_size: int = Field(10, ge=1, le=1_000_000, description="images per attack batch")
    chunk_size: Optional[int] = Field(None, ge=1, le=10_000_000, description="most chains per forward pass; "
                                      "null = 1024 on the CPU, as many as fit the free memory on CUDA")
    precision: Literal["float32", "float64", "bf16"] = Field(
        "float32", description="float64 for exact cross-checks; bf16: the EBM under bf16 autocast, chains in float32")
    seed: int = Field(0, ge=0, lt=2**32)
    output: URL = "runs/attack"
    ray: RayConfig = Field(default_factory=lambda: RayConfig())
    mlflow: MLflowConfig = Field(default_factory=lambda: MLflowConfig())

    @model_validator(mode="after")
    def _needs_ebm(self):
        if self.attack.defended and self.ebm is None and self.purify.step_size > 0:
            raise ValueError(f"attack.mode={self.attack.mode} purifies with an EBM: set ebm to a checkpoint URL "
                             "(or purify.step_size=0 for noise-only chains)")
        if self.attack.loss == "dlr" and self.classifier.num_classes < 3:
            raise ValueError(f"attack.loss=dlr needs at least 3 classes (classifier.num_classes="
                             f"{self.classifier.num_classes})")
        return self


class SearchRange(Section):
    """One searched parameter: [low, high], log-uniform by default, integers for `steps`."""

    low: float
    high: float
    log: bool = True


PURIFY_PARAMS = ("steps", "step_size", "noise")


class SearchConfig(Section):
    """What both Ray Tune searches share: the evaluation, held-out images, space, ASHA, objective."""

    attack: AttackConfig = Field(default_factory=lambda: AttackConfig(
        data=DataConfig(id_range=[0, 500]), ebm="runs/ebm-cpu/ebm.pt", purify=LangevinConfig(steps=200), batch_size=5,
        attack=AttackSettings(steps=10, eot_attack=4, eot_defense=8)),
        description="the evaluation every trial runs (a cheap BPDA+EOT)")
    validation: DataConfig = Field(default_factory=lambda: DataConfig(id_range=[500, 1000], random=200),
                                   description="the search's images: exact test images disjoint (by id) from the "
                                   "evaluation's (attack.data), by default 200 of ids 500-999")
    validation_images: Literal["held_out_test", "training"] = Field(
        "held_out_test", description="held_out_test: validation comes from the evaluation's test file, no id shared "
        "with attack.data; training: training images (which the classifier and the EBM learned from: optimistic)")
    natural_figure: Literal["defense", "protocol"] = Field(
        "defense", description="which natural accuracy natural_floor and the natural objective read: the defense's "
        "own vote on the clean image, or the protocol's (check or confirmation right)")
    space: dict[str, SearchRange] = Field(default_factory=lambda: {
        "step_size": SearchRange(low=0.25, high=2.0), "noise": SearchRange(low=0.003, high=0.03),
        "steps": SearchRange(low=50, high=1500)})
    rungs: list[Annotated[int, Field(ge=1)]] = Field([25, 50, 100, 200], min_length=1)
    trials: int = Field(16, ge=1, le=100_000)
    reduction_factor: float = Field(2.0, gt=1.0, le=100.0)
    objective: Literal["robust_with_floor", "robust", "natural"] = "robust_with_floor"
    natural_floor: float = Field(0.7, ge=0.0, le=1.0)
    max_concurrent: Optional[int] = Field(None, ge=1, description="trials at once; null = as many as fit")
    seed: int = Field(0, ge=0, lt=2**32)
    output: URL = "runs"
    name: str = Field("tune", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="search name: the same name and output resume the search")
    mlflow: MLflowConfig = Field(default_factory=lambda: MLflowConfig())

    @field_validator("space", mode="before")
    @classmethod
    def _drop_nulls(cls, space):
        """`space.noise: null` leaves that parameter out of the search."""
        return {k: v for k, v in space.items() if v is not None} if isinstance(space, dict) else space

    @model_validator(mode="after")
    def _space_and_data(self):
        if not self.space:
            raise ValueError("space is empty: name at least one of " + ", ".join(PURIFY_PARAMS))
        for name, r in self.space.items():
            if name not in PURIFY_PARAMS:
                raise ValueError(f"space.{name}: unknown parameter; searchable: {', '.join(PURIFY_PARAMS)}")
            if r.low > r.high:
                raise ValueError(f"space.{name}: low {r.low:g} > high {r.high:g}")
            if r.log and r.low <= 0:
                raise ValueError(f"space.{name}: a log-uniform range needs low > 0 (got {r.low:g})")
            if name == "steps" and (r.low < 1 or r.low != int(r.low) or r.high != int(r.high)):
                raise ValueError(f"space.steps: integer bounds >= 1 (got {r.low:g}..{r.high:g})")
        if sorted(self.rungs) != self.rungs or len(set(self.rungs)) != len(self.rungs):
            raise ValueError(f"rungs must grow strictly (got {self.rungs})")
        v = self.validation
        if self.validation_images == "training" and (v.split != "train" or v.path == self.attack.data.path):
            raise ValueError("validation_images = training: validation must be a training-split file, not the "
                             f"evaluation's (split={v.split}, path={v.path})")
        if self.validation_images == "held_out_test" and v.split != "test":
            raise ValueError(f"validation_images = held_out_test: validation.split must be test (got {v.split}); "
                             "for training images set validation_images=training")
        return self


class TunePurificationConfig(SearchConfig):
    """Search the purifier's settings; `rungs` = validation images per ASHA rung; `attack` is also the
    base of the best-settings file (its `data` are the images that file evaluates)."""

    name: str = Field("tune-purification", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")


class TuneTrainingConfig(SearchConfig):
    """Search the training sampler's settings; each trial is a Ray Train run of `train` with the
    trial's Langevin settings, evaluated as a purifier (with `attack.purify`) after each rung;
    `rungs` = training iterations per ASHA rung. The validation ids are held out of training."""

    train: TrainEBMConfig = Field(default_factory=lambda: TrainEBMConfig(
        ebm=EBMConfig(width=16), langevin=LangevinConfig(steps=20), batch_size=64, bank_size=10_000,
        sgd_start=100_000, checkpoint_every=100, log_every=50, ray=EBMRayConfig(workers=1)))
    space: dict[str, SearchRange] = Field(default_factory=lambda: {
        "step_size": SearchRange(low=0.25, high=2.0), "noise": SearchRange(low=0.003, high=0.03),
        "steps": SearchRange(low=10, high=100)})
    rungs: list[Annotated[int, Field(ge=1)]] = Field([100, 200, 400], min_length=1)
    name: str = Field("tune-training", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")


class QuickstartConfig(Section):
    """The README's end-to-end run: a small EBM, then the ResNet-20 undefended and defended."""

    train: TrainEBMConfig = Field(default_factory=lambda: TrainEBMConfig(
        ebm=EBMConfig(width=16), langevin=LangevinConfig(steps=20), iterations=400, batch_size=64,
        bank_size=10_000, sgd_start=100_000, checkpoint_every=100, log_every=20, ray=EBMRayConfig(workers=2)))
    attack: AttackConfig = Field(default_factory=lambda: AttackConfig(
        data=DataConfig(count=20), purify=LangevinConfig(steps=100), batch_size=10,
        attack=AttackSettings(steps=20, eot_attack=4, eot_defense=8), ebm="(set by quickstart)"))
    output: URL = "runs/quickstart"


# --- loading ---------------------------------------------------------------------------------

def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif not loc:  # a check across keys: its message names them
            parts.append(msg)
        else:
            shown = e.get("input")
            value = "" if isinstance(shown, dict) else f" = {shown!r}"
            parts.append(f"{loc}{value}: {msg}")
    return "; ".join(parts)


def _laid_over(base: Any, update: Any) -> Any:
    """`update` laid over `base`, mapping by mapping (OmegaConf's merge, for trees built in code)."""
    if isinstance(base, dict) and isinstance(update, dict):
        return {**base, **{k: _laid_over(base.get(k), v) for k, v in update.items()}}
    return update


def build(cls: type[Section], tree: dict | None) -> Section:
    """Validate `tree` laid over the job's defaults (so a partial section keeps the rest)."""
    try:
        return cls.model_validate(_laid_over(cls.model_construct().model_dump(), tree or {}))
    except ValidationError as err:
        raise ConfigError(f"config error: {_describe(err)}") from None


def _omegaconf_error(err: Exception, where: str) -> ConfigError:
    """One line from an OmegaConf or YAML error: what is wrong and where."""
    import yaml

    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        m = err.problem_mark
        return ConfigError(f"{where} is not valid YAML: line {m.line + 1}, column {m.column + 1}: {err.problem}")
    if isinstance(err, yaml.YAMLError):
        return ConfigError(f"{where} is not valid YAML: {str(err).splitlines()[0]}")
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    hint = (" (environment variables: ${oc.env:VAR} or ${oc.env:VAR,default})"
            if type(err).__name__ == "UnsupportedInterpolationType" else "")
    return ConfigError(f"{where}{f', key {key}' if key else ''}: {first}{hint}")


def _read_file(path: str | os.PathLike):
    from omegaconf import DictConfig, OmegaConf

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file (not UTF-8)") from None
    try:
        conf = OmegaConf.create(text)
    except Exception as err:  # yaml's parse errors, OmegaConf's key errors
        raise _omegaconf_error(err, f"config file {path}") from None
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top (key: value lines)")
    return conf


def load_config(cls: type[Section], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Section:
    """The job's defaults, the YAML file over them, the dotted overrides over that (all merged and
    interpolated by OmegaConf), validated by pydantic. A `null` removes a search dimension."""
    from omegaconf import OmegaConf

    layers = [OmegaConf.create(cls.model_construct().model_dump())]
    if path is not None:
        layers.append(_read_file(path))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key or not all(key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (dotted key, e.g. attack.steps=10)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:
        raise _omegaconf_error(err, "overrides") from None
    try:
        tree = OmegaConf.to_container(OmegaConf.merge(*layers), resolve=True)
    except Exception as err:
        raise _omegaconf_error(err, f"config {path or '(defaults)'}") from None
    return build(cls, tree)


def to_yaml(cfg: Section) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
