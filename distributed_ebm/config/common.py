"""What every job's config is built from: the base section, budgets and URLs, data, networks, Langevin,
Ray and MLflow sections. Choices read the method's own tables (one table per choice)."""
from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..method.nets import ACTIVATIONS, ARCHITECTURES
from ..method.nets.formats import format_names
from ..method.precision import PRECISIONS


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


def _folder_name(value: str) -> str:
    if set(value) == {"."}:
        raise ValueError(f"{value!r} is not a folder name of its own: the run would be written outside output")
    return value


# A run's folder under `output`: letters, digits, _ . - (no path component, not . or ..)
RunName = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(_folder_name)]
"""A local path (made absolute) or fsspec URL (s3://...)."""


# The keys every job's top level shares: declared once here, each job giving its own default.
Seed = Annotated[int, Field(ge=0, lt=2**32, description="the run seed: every random draw of the run is keyed by it "
                            "(with the image id, the iteration, the chain, ...), so a rerun or a resume repeats them; "
                            "a search's Optuna sampler is seeded with it")]
Output = Annotated[URL, Field(description="the folder (a local path or URL) the run writes into: records, "
                              "checkpoints, weights, summaries (under output/name where the job has a name); a rerun "
                              "into the same folder resumes")]
_PRECISION = ("the arithmetic (method/precision.py PRECISIONS): float32 (on CUDA: TF32 convolutions and matmuls); "
              "float32_strict (on CUDA: TF32 off, deterministic cuDNN and algorithms: repeatable bit for bit, a resume "
              "included; slower); float64 (attacks only) for exact cross-checks (results then independent of batching "
              "to the last bit); bf16: the EBM's forward and backward under bf16 autocast (in training: inside the "
              "Langevin chains only), chains, classifier, loss and update in float32. It changes results: part of a "
              "training checkpoint's fingerprint")
Precision = Annotated[Literal[tuple(PRECISIONS)], Field(description=_PRECISION)]
TrainingPrecision = Annotated[Literal[tuple(p for p in PRECISIONS if p != "float64")], Field(description=_PRECISION)]


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
                                                                  "[low, high): only images with these ids (before the "
                                                                  "subset)")

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


Activation = Literal[tuple(ACTIVATIONS)]


class EBMConfig(Section):
    width: int = Field(32, ge=1, le=1024, description="channels of the first conv (paper: 32)")
    image_size: int = Field(32, ge=8, le=1024)
    channels: int = Field(3, ge=1, le=16)
    activation: Activation = Field("lrelu", description="lrelu: the paper's LeakyReLU(0.05); soft_lrelu: MEFA's "
                                   "(1 - a) x + a sqrt(x^2 + e^2) - a e (slopes 1 and 1 - 2a); silu. Recorded in "
                                   "the checkpoint and checked on load (a checkpoint without it is lrelu)")
    soft_alpha: float = Field(0.49, gt=0.0, lt=0.5, description="soft_lrelu's a (left slope 1 - 2a)")
    soft_eps: float = Field(0.01, gt=0.0, le=10.0, description="soft_lrelu's e (width of the bend)")


class EBMNetConfig(Section):
    """What an attack expects of its EBM checkpoint (which records its own network)."""

    activation: Optional[Activation] = Field(None, description="the activation the attack expects of the checkpoint "
                                             "(which records its own): null = whatever it holds; set = must match, "
                                             "else one line naming both. ebm_format=mefa: required (MEFA's files "
                                             "do not record it)")
    soft_alpha: float = Field(0.49, gt=0.0, lt=0.5, description="soft_lrelu's a, checked against the checkpoint's "
                              "when activation is soft_lrelu")
    soft_eps: float = Field(0.01, gt=0.0, le=10.0, description="soft_lrelu's e, checked likewise")


class LangevinConfig(Section):
    """x <- x - step_size * grad f(x) + noise * xi."""

    steps: int = Field(100, ge=0, le=1_000_000, description="Langevin steps per chain (K)")
    step_size: float = Field(1.0, ge=0.0, le=1e6, description="s in x <- x - s grad f(x) + noise xi; 0 gives "
                             "noise-only chains (the attack's control)")
    noise: float = Field(0.01, ge=0.0, le=10.0, description="sd of the Gaussian noise added at each step (sigma)")


class ClassifierConfig(Section):
    arch: Literal[tuple(ARCHITECTURES)] = Field("resnet20",
                                                description="the network (method/nets/classifiers.py ARCHITECTURES): "
                                                            "CIFAR ResNet-20/32/44/56, WRN-28-10 (wrn28_10: this "
                                                            "project's bias-free variant; wrn28_10_ss: the Stochastic "
                                                            "Security authors' network, whose released weights load "
                                                            "into it), or wrn / wrn_ss of wrn_depth and wrn_widen")
    format: Literal[("auto", *format_names("classifier"))] = Field(
        "auto", description="how weights is read (method/nets/formats.py FORMATS): auto (a .pt2 program: export; "
        "else debm), debm (this project's checkpoint or a bare state dict of arch), stochastic_security (the "
        "authors' WRN state dict, its shape from its keys; arch wrn28_10_ss or wrn_ss), export (torch.export)")
    weights: Optional[URL] = Field(default_factory=lambda: shared("weights/resnet20-12fca82f.th"),
                                   description="checkpoint URL; null = random init")
    num_classes: int = Field(10, ge=2, le=100_000)
    wrn_depth: int = Field(28, ge=10, le=100, description="arch=wrn only")
    wrn_widen: int = Field(10, ge=1, le=20, description="arch=wrn only")
    mean: Optional[list[float]] = Field(None, min_length=3, max_length=3,
                                        description="input normalization; null = the arch's own")
    std: Optional[list[Annotated[float, Field(gt=0)]]] = Field(None, min_length=3, max_length=3,
                                                               description="input normalization's std; null = the "
                                                                           "arch's own")


class RaySection(Section):
    """What every Ray section holds: where the cluster is, whether its nodes share a filesystem, and how long a job
    waits for the nodes an autoscaler adds."""

    address: Optional[str] = Field(None, description="Ray address; null = RAY_ADDRESS, or a new local Ray")
    shared_filesystem: bool = Field(False, description="a local `output` is on a filesystem every node of the "
                                    "cluster shares (NFS, ...); without it a local output on a cluster of several "
                                    "nodes is refused, since each node would write its part to its own disk")
    provision_timeout_s: float = Field(900.0, gt=0, le=86_400, description="on a cluster with an autoscaler: how "
                                       "long a job waits for the nodes its workers or actors need to be added (a GPU "
                                       "node boots in minutes) before it fails")


class RayConfig(RaySection):
    """Where the Ray engine runs and what each actor asks for."""

    actors: Optional[int] = Field(None, ge=1, description="most actors of the elastic pool; null = as many as the "
                                  "cluster can hold (its autoscaler's nodes included)")
    cpus_per_actor: float = Field(1.0, gt=0, le=1024, description="CPUs each attack actor asks for")
    gpus_per_actor: Optional[float] = Field(None, ge=0, le=64,
                                            description="GPUs per attack actor; null = auto: 1 where a node has a GPU "
                                                        "or the autoscaler can add one, else 0 (docs/cluster.md)")
    max_failures: int = Field(3, ge=0, le=1000, description="node losses tolerated within any hour (the actors of one "
                              "node lost together count once); each costs the batches its actors held, run again")


class MLflowConfig(Section):
    enabled: bool = True
    tracking_uri: Optional[str] = Field(None, description="null = MLFLOW_TRACKING_URI, or sqlite:///<cwd>/runs/mlflow.db")
    experiment: str = Field("distributed-ebm", min_length=1)
    artifact_location: Optional[URL] = Field(None, description="for a new experiment; null = <cwd>/runs/mlartifacts")
    run_name: Optional[str] = None


class TrainRayConfig(RaySection):
    """A Ray Train run: DDP workers, their resources, failures tolerated, checkpoints kept."""

    workers: int = Field(1, ge=1, le=4096, description="DDP workers, each taking its share of every batch "
                         "(train-ebm: batch_size must split evenly over them)")
    use_gpu: Optional[bool] = Field(None, description="one GPU per worker; null = auto: where a node has a GPU or "
                                    "the autoscaler can add one (docs/cluster.md)")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs per training worker")
    max_failures: int = Field(3, ge=-1, description="worker failures to recover from (-1 = no limit)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints Ray Train keeps; older ones are deleted")
    startup_timeout_s: float = Field(60.0, gt=0, le=86_400, description="how long a (re)started run waits for "
                                    "its workers' resources before it fails (e.g. after losing a node)")


class EBMRayConfig(TrainRayConfig):
    bank_shards: int = Field(1, ge=1, le=4096, description="replay-buffer actors holding the bank")
