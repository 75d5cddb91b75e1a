"""Run an attack config in one process on one device, without Ray, MLflow or s3fs.

For any machine with one GPU and no Ray: the same records, summary and plot
as `debm attack` (one recipe, `recipes.attack.run_attack`, here on the one-process executor `OneProcess`),
resumable the same way, under `output`. Nothing is logged to MLflow.

    python3 jobs/attack_local.py --config jobs/configs/results/defended_bpda_eot.yaml [--device cuda] [key=value ...]
"""
from __future__ import annotations

import argparse

from ..errors import exit_status

from ..config import AttackConfig, load_config
from ..method.cuda import job_device
from ..recipes.attack import run_attack
from .attack import OneProcess
from ..results.report import attack_done


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attack_local", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="attack YAML (e.g. jobs/configs/attack_mefa.yaml)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.random=40")
    return p


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(AttackConfig, args.config, args.overrides)
    device = job_device(args.device)
    print(f"attack-local: {cfg.attack.name} on {device}, output {cfg.output}", flush=True)
    summary = run_attack(cfg, OneProcess(device))
    print(attack_done(summary, cfg.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return exit_status("attack_local", lambda: _main(args))
