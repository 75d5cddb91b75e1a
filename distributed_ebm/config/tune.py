"""The Ray Tune searches' configs: the purifier's settings, or the training sampler's."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .attack import AttackConfig, AttackSettings
from .common import DataConfig, EBMConfig, EBMRayConfig, LangevinConfig, MLflowConfig, Output, RunName, Section, Seed
from .train import TrainEBMConfig


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
    rungs: list[Annotated[int, Field(ge=1)]] = Field([25, 50, 100, 200], min_length=1, description="ASHA's rungs, "
                                                     "growing: how many validation images a trial has been judged on "
                                                     "at each")
    trials: int = Field(16, ge=1, le=100_000, description="trials Optuna proposes")
    reduction_factor: float = Field(2.0, gt=1.0, le=100.0, description="ASHA's reduction factor: about 1 / this of "
                                    "the trials go on past each rung")
    objective: Literal["robust_with_floor", "robust", "natural"] = Field("robust_with_floor",
                                                                         description="what a trial maximizes: robust "
                                                                                     "accuracy among trials whose "
                                                                                     "natural figure reaches "
                                                                                     "natural_floor (the others rank "
                                                                                     "below, by natural accuracy), "
                                                                                     "robust accuracy, or natural "
                                                                                     "accuracy")
    natural_floor: float = Field(0.7, ge=0.0, le=1.0, description="robust_with_floor: trials whose natural accuracy "
                                 "(natural_figure) reaches it are ranked by robust accuracy, every other one below "
                                 "them")
    max_concurrent: Optional[int] = Field(None, ge=1, description="trials at once; null = as many as fit")
    seed: Seed = 0
    output: Output = "runs"
    name: RunName = Field("tune",
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

    name: RunName = "tune-purification"


class TuneTrainingConfig(SearchConfig):
    """Search the training sampler's settings; each trial is a Ray Train run of `train` with the
    trial's Langevin settings, evaluated as a purifier (with `attack.purify`) after each rung;
    `rungs` = training iterations per ASHA rung. The validation ids are held out of training."""

    train: TrainEBMConfig = Field(default_factory=lambda: TrainEBMConfig(
        ebm=EBMConfig(width=16), langevin=LangevinConfig(steps=20), batch_size=64, bank_size=10_000,
        sgd_start=100_000, checkpoint_every=100, log_every=50, ray=EBMRayConfig(workers=1)),
        description="the training run each trial makes, with the trial's langevin settings and the validation ids "
        "held out")
    space: dict[str, SearchRange] = Field(default_factory=lambda: {
        "step_size": SearchRange(low=0.25, high=2.0), "noise": SearchRange(low=0.003, high=0.03),
        "steps": SearchRange(low=10, high=100)})
    rungs: list[Annotated[int, Field(ge=1)]] = Field([100, 200, 400], min_length=1,
                                                     description="ASHA's rungs: training iterations, growing")
    name: RunName = "tune-training"
