"""The README's end-to-end run's config."""
from __future__ import annotations

from pydantic import Field

from .attack import AttackConfig, AttackSettings
from .common import DataConfig, EBMConfig, EBMRayConfig, LangevinConfig, Output, Section
from .train import TrainEBMConfig


class QuickstartConfig(Section):
    """The README's end-to-end run: a small EBM, then the ResNet-20 undefended and defended."""

    train: TrainEBMConfig = Field(default_factory=lambda: TrainEBMConfig(
        ebm=EBMConfig(width=16), langevin=LangevinConfig(steps=20), iterations=400, batch_size=64,
        bank_size=10_000, sgd_start=100_000, checkpoint_every=100, log_every=20, ray=EBMRayConfig(workers=2)),
        description="the small EBM trained first, on Ray Train (into output/ebm)")
    attack: AttackConfig = Field(default_factory=lambda: AttackConfig(
        data=DataConfig(count=20), purify=LangevinConfig(steps=100), batch_size=10,
        attack=AttackSettings(steps=20, eot_attack=4, eot_defense=8), ebm="(set by quickstart)"),
        description="both attacks on the Ray Data engine: PGD on the undefended classifier, then BPDA+EOT through "
        "the trained EBM (into output/pgd, output/bpda_eot)")
    output: Output = "runs/quickstart"
