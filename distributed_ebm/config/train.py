"""The training jobs' configs: the EBM (maximum likelihood with a persistent bank) and natural classifiers."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from ..method.nets.formats import format_names
from .common import (
    URL,
    ClassifierConfig,
    DataConfig,
    EBMConfig,
    EBMRayConfig,
    LangevinConfig,
    MLflowConfig,
    Output,
    RunName,
    Section,
    Seed,
    TrainingPrecision,
    TrainRayConfig,
    shared,
)


class TrainEBMConfig(Section):
    data: DataConfig = Field(default_factory=lambda: DataConfig(path=shared("datasets/cifar10/train.parquet"),
                                                                split="train"))
    ebm: EBMConfig = Field(default_factory=lambda: EBMConfig())
    init_ebm: Optional[URL] = Field(None, description="fine-tune: the EBM whose weights iteration 0 starts from (a "
                                    "released file or this project's checkpoint of the network `ebm` describes); "
                                    "null = new weights drawn from seed")
    init_ebm_format: Literal[("auto", *format_names("ebm"))] = Field(
        "auto", description="how init_ebm is read (method/nets/formats.py FORMATS): auto, debm, stochastic_security, "
        "mefa (with ebm.activation soft_lrelu or silu); jem and export hold other networks, which training does not "
        "build")
    langevin: LangevinConfig = Field(default_factory=lambda: LangevinConfig())
    iterations: int = Field(250_000, ge=1, description="training iterations (the paper: 250,000)")
    batch_size: int = Field(100, ge=1, le=100_000, description="training images and bank chains per iteration")
    data_noise: float = Field(0.02, ge=0.0, le=10.0, description="sd of Gaussian noise added to positives")
    adam_lr: float = Field(1e-4, gt=0, le=1.0, description="Adam's learning rate, until sgd_start")
    sgd_start: int = Field(125_000, ge=0, description="iteration at which Adam is replaced by plain SGD")
    sgd_lr: float = Field(5e-5, gt=0, description="SGD lr in units of noise^2/2: lr = sgd_lr * langevin.noise^2 / 2 "
                          "(paper: 5e-5)")
    bank_size: Optional[int] = Field(None, ge=1, description="persistent chains; null = one per training image")
    bank_init: Literal["noise", "data"] = Field("noise",
                                                description="where a fresh chain starts: uniform noise in [-1, 1] (the "
                                                            "paper), or a training image")
    rejuvenation: float = Field(0.0, ge=0.0, le=1.0, description="chance a drawn chain restarts from bank_init")
    precision: TrainingPrecision = "float32"
    seed: Seed = 0
    checkpoint_every: int = Field(1000, ge=1,
                                  description="iterations between checkpoints (one is also written at the end)")
    log_every: int = Field(100, ge=1, description="iterations per metric window: the means logged and kept in the "
                           "checkpoint's history")
    output: Output = "runs/ebm"
    name: RunName = Field("ebm",
                      description="run name: the same name and output resume the run")
    ray: EBMRayConfig = Field(default_factory=lambda: EBMRayConfig())
    mlflow: MLflowConfig = Field(default_factory=lambda: MLflowConfig())

    @model_validator(mode="after")
    def _sizes(self):
        if self.ebm.image_size != self.data.image_size:
            raise ValueError(f"ebm.image_size {self.ebm.image_size} differs from data.image_size "
                             f"{self.data.image_size}")
        if self.batch_size % self.ray.workers:
            raise ValueError(f"batch_size = {self.batch_size} does not split evenly over ray.workers = "
                             f"{self.ray.workers} (each worker takes batch_size / ray.workers chains)")
        return self


class TrainClassifierConfig(Section):
    data: DataConfig = Field(default_factory=lambda: DataConfig(path=shared("datasets/cifar10/train.parquet"),
                                                                split="train"))
    test_data: Optional[DataConfig] = Field(default_factory=lambda: DataConfig())
    classifier: ClassifierConfig = Field(default_factory=lambda: ClassifierConfig(arch="wrn28_10", weights=None))
    epochs: int = Field(100, ge=1, description="training epochs, a checkpoint after each")
    batch_size: int = Field(100, ge=1, le=100_000)
    lr: float = Field(0.1, gt=0, le=10.0, description="SGD's initial learning rate")
    lr_milestones: list[Annotated[int, Field(ge=1)]] = Field([40, 60],
                                                             description="epochs at which the learning rate is "
                                                                         "multiplied by lr_gamma")
    lr_gamma: float = Field(0.1, gt=0, le=1.0,
                            description="factor applied to the learning rate at each of lr_milestones (epochs)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(2e-4, ge=0.0, le=1.0)
    augment: bool = Field(True, description="random crop (4 pixels of padding) and horizontal flip")
    seed: Seed = 0
    output: Output = "runs/classifier"
    name: RunName = Field("classifier",
                      description="run name: the same name and output resume the run")
    ray: TrainRayConfig = Field(default_factory=lambda: TrainRayConfig())
    mlflow: MLflowConfig = Field(default_factory=lambda: MLflowConfig())


class StandaloneTrainConfig(TrainEBMConfig):
    """The training config of the one-GPU job (no Ray) plus the re-burn of a bank that did not travel with its
    checkpoint (its `ray` and `mlflow` sections are read and unused)."""

    reburn_steps: int = Field(500, ge=0, le=1_000_000,
                              description="Langevin steps that rebuild the bank on resume (the most, with "
                                          "reburn_match)")
    reburn_match: bool = Field(True, description="stop the re-burn once the first chunk's mean energy reaches the "
                                                 "bank's at the last save (checked every reburn_check steps); every "
                                                 "chain then runs as many steps")
    reburn_check: int = Field(10, ge=1, le=100_000, description="Langevin steps between the re-burn's energy checks")
    reburn_chunk: int = Field(10_000, ge=1, le=1_000_000, description="chains per batch of the re-burn")
