"""Typed job configs, one module per job (train, attack, tune, quickstart) over the shared sections
(common) and the loader (load). Every number of the paper is a default here, never a constant in the code."""
from ..errors import ConfigError, InputError, JobFailed, run_job
from .attack import AttackConfig, AttackSettings, ReportConfig
from .common import (
    URL,
    Budget,
    ClassifierConfig,
    DataConfig,
    EBMConfig,
    EBMNetConfig,
    EBMRayConfig,
    LangevinConfig,
    MLflowConfig,
    RayConfig,
    Section,
    TrainRayConfig,
    shared,
)
from .load import build, load_config, to_yaml, validation_message
from .quickstart import QuickstartConfig
from .train import StandaloneTrainConfig, TrainClassifierConfig, TrainEBMConfig
from .tune import PURIFY_PARAMS, SearchConfig, SearchRange, TunePurificationConfig, TuneTrainingConfig

__all__ = [  # the package's interface: callers import these from distributed_ebm.config
    "ConfigError", "InputError", "JobFailed", "run_job",
    "AttackConfig", "AttackSettings", "ReportConfig",
    "URL", "Budget", "ClassifierConfig", "DataConfig", "EBMConfig", "EBMNetConfig", "EBMRayConfig", "LangevinConfig",
    "MLflowConfig", "RayConfig", "Section", "TrainRayConfig", "shared",
    "build", "load_config", "to_yaml", "validation_message",
    "QuickstartConfig",
    "StandaloneTrainConfig", "TrainClassifierConfig", "TrainEBMConfig",
    "PURIFY_PARAMS", "SearchConfig", "SearchRange", "TunePurificationConfig", "TuneTrainingConfig",
]
