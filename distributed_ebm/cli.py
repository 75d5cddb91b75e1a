"""`debm`: the same functions the jobs in jobs/ call.

    debm train-ebm        --config jobs/configs/train_ebm_cpu.yaml  iterations=100
    debm train-classifier --config jobs/configs/train_classifier_resnet20.yaml
    debm attack           --config jobs/configs/attack_bpda_eot.yaml  ebm=runs/ebm/ebm.pt attack.steps=10
    debm tune             --config jobs/configs/tune_purification.yaml
    debm tune-training    --config jobs/configs/tune_training.yaml
    debm quickstart       (the README's end-to-end run)
    debm report           runs/attack-pgd runs/attack-bpda_eot   (the accuracy table of results folders)

Every command validates its config and checks every input it will touch before any work; a bad
one prints one line and exits with 2. Ray's own logs stay in its session folder unless --verbose.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError, InputError, exit_status

from .config import AttackConfig, QuickstartConfig, TrainClassifierConfig, TrainEBMConfig, TunePurificationConfig, TuneTrainingConfig, load_config, to_yaml

COMMANDS = {
    "train-ebm": (TrainEBMConfig, "train the EBM (maximum likelihood, persistent bank)"),
    "train-classifier": (TrainClassifierConfig, "train a natural classifier"),
    "attack": (AttackConfig, "evaluate a defense: natural and robust accuracy under attack"),
    "tune": (TunePurificationConfig, "search the purifier's step size, noise and steps (Ray Tune, Optuna, ASHA)"),
    "tune-training": (TuneTrainingConfig, "search the training sampler's step size, noise and steps"),
    "quickstart": (QuickstartConfig, "train a small EBM, then attack the ResNet-20 undefended and defended"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="debm", description="distributed-ebm: EBM adversarial purification")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--config", help="YAML config (defaults: the paper's settings)")
        s.add_argument("--print-config", action="store_true", help="print the validated config and exit")
        s.add_argument("--verbose", action="store_true", help="also print Ray's, Ray Train's and Ray Data's own logs")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. attack.steps=10")
    r = sub.add_parser("report", help="print the accuracy table of one or more attack results folders")
    r.add_argument("urls", nargs="+", metavar="URL", help="attack output folders (local or s3://)")
    r.add_argument("--plot", metavar="URL", help="also write their accuracy curves, in one PNG, here")
    r.add_argument("--gallery", type=int, metavar="N", help="also draw each run's gallery.png of its first N images "
                                                           "by id (from its records and its config)")
    return p


def parse(command: str, config: str | None, overrides: list[str]):
    """The command's validated config; `config` may be a URL (a search on S3 writes its best settings there)."""
    data = None
    if config is not None and "://" in config:
        from .store import storage
        if not storage.exists(config):
            raise ConfigError(f"config file {config} does not exist")
        data = storage.read_bytes(config)
    return load_config(COMMANDS[command][0], config, overrides, data)


def run(command: str, cfg) -> None:
    """Run a validated config on Ray (the cluster at ray.address / RAY_ADDRESS, or a new local one):
    the single entry point of the CLI and of jobs/. Workers and actors use a GPU when they get one."""
    if command == "train-ebm":
        from .distributed.train import train_ebm_on_ray
        out = train_ebm_on_ray(cfg)
        print(f"EBM trained to iteration {out['iteration']}: {out['ebm']} (checkpoint: {out['checkpoint']})")
    elif command == "train-classifier":
        from .distributed.train_classifier import train_classifier_on_ray
        out = train_classifier_on_ray(cfg)
        print(f"classifier trained to epoch {out['epoch']}: {out['classifier']} (test accuracy {out.get('test_accuracy')})")
    elif command == "attack":
        from .distributed.attack import evaluate
        from .results.report import attack_done
        print(attack_done(evaluate(cfg), cfg.output))
    elif command in ("tune", "tune-training"):
        from .distributed.tune import tune_purification, tune_training
        best = (tune_purification if command == "tune" else tune_training)(cfg)
        print(f"best of {len(best['trials'])} trials ({best['stopped_early']} stopped early by ASHA): "
              f"{best['params']} -> {best['metrics']}")
        job = "attack" if command == "tune" else "train_ebm"
        print(f"best settings: {best['file']}  (run: python jobs/{job}.py --config {best['file']})")
    elif command == "quickstart":
        from .quickstart import quickstart
        quickstart(cfg)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        from .store import storage
        from .results.report import (defense_key, format_paired, format_table, format_worst_over_runs, plot_curves,
                                     system_and_attack_labels)
        from .results.records import load_summary, paired_comparison, worst_case_over_runs
        try:
            if args.plot:
                storage.check_destination(args.plot, "--plot")
            summaries = [load_summary(url) for url in args.urls]
            print(format_table(summaries))
            by_defense: dict[str, list[tuple[str, dict]]] = {}
            for url, summary in zip(args.urls, summaries):
                by_defense.setdefault(defense_key(summary), []).append((url, summary))
            worst = [(system_and_attack_labels(runs[0][1])[0], worst_case_over_runs([url for url, _ in runs]))
                     for runs in by_defense.values() if len(runs) > 1]
            worst = [w for w in worst if w[1] is not None]
            if worst:
                print("\n" + format_worst_over_runs(worst))
            pairs = [(a, b, paired_comparison(a, b)) for k, a in enumerate(args.urls) for b in args.urls[k + 1:]]
            pairs = [p for p in pairs if p[2] is not None]
            if pairs:
                print("\n" + format_paired(pairs))
            if args.plot:
                plot_curves(summaries, args.plot)
            for url, summary in zip(args.urls, summaries) if args.gallery else ():
                from .config import AttackConfig, build
                from .local.attack import draw_gallery

                cfg = build(AttackConfig, {**summary["config"], "output": url,
                                           "report": {**summary["config"].get("report", {}), "gallery": args.gallery}})
                print(f"gallery: {draw_gallery(cfg)}")
        except FileNotFoundError as err:
            print(f"debm report: {err} (is it an attack output folder?)", file=sys.stderr)
            return 2
        except InputError as err:
            print(f"debm report: {err}", file=sys.stderr)
            return 2
        return 0
    if args.verbose:
        os.environ["DEBM_VERBOSE"] = "1"
    elif os.environ.get("DEBM_VERBOSE") != "1":
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's INFO lines (database set-up ...)
    def job():
        cfg = parse(args.command, args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return
        ray_before = ray_running()
        try:
            run(args.command, cfg)
        finally:  # a Ray this job started ends with it, also when called in a process that goes on
            if ray_running() and not ray_before:
                sys.modules["ray"].shutdown()

    return exit_status(f"debm {args.command}", job)

def ray_running() -> bool:
    """Whether this process is connected to a Ray (without importing Ray)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":
    sys.exit(main())
