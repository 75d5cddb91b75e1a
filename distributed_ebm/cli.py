"""`debm`: the same functions the jobs in jobs/ call.

    debm train-ebm        --config jobs/configs/train_ebm_cpu.yaml  iterations=100
    debm train-classifier --config jobs/configs/train_classifier_resnet20.yaml
    debm attack           --config jobs/configs/attack_bpda_eot.yaml  ebm=runs/ebm/ebm.pt attack.steps=10
    debm tune             --config jobs/configs/tune_purification.yaml
    debm tune-training    --config jobs/configs/tune_training.yaml
    debm quickstart       (the README's end-to-end run)
    debm report           runs/attack-pgd runs/attack-bpda_eot   (the accuracy table of results folders)
    debm import           ebm.pth --format stochastic_security --out models/ss/ebm.pt   (a released model)

Without Ray, MLflow or s3fs, in one process on one device (docs/gpu.md):

    debm attack-local     --config jobs/configs/attack_mefa.yaml [--device cuda] [key=value ...]
    debm train-ebm-gpu    --config jobs/configs/train_ebm_cifar10.yaml --minutes 8 --out DIR \\
                          [--resume models/ebm-cifar10-gpu/ckpt.pt] [--keep-bank] [key=value ...]
    debm train-ebm-gpu    --card models/ebm-cifar10-gpu     (rewrite the card from its ckpt.pt)

Dotted `key=value` overrides may stand anywhere on the line, before or after the options. Every command
validates its config and checks every input it will touch before any work; a bad one prints one line
and exits with 2. Ray's own logs stay in its session folder unless --verbose. This module imports neither
Ray nor MLflow, so the one-process commands (and jobs/) run where only torch, pydantic and omegaconf are.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .config import (
    AttackConfig,
    QuickstartConfig,
    TrainClassifierConfig,
    TrainEBMConfig,
    TunePurificationConfig,
    TuneTrainingConfig,
    load_config,
    to_yaml,
)
from .errors import ConfigError, InputError, run_job

COMMANDS = {
    "train-ebm": (TrainEBMConfig, "train the EBM (maximum likelihood, persistent bank)"),
    "train-classifier": (TrainClassifierConfig, "train a natural classifier"),
    "attack": (AttackConfig, "evaluate a defense: natural and robust accuracy under attack"),
    "tune": (TunePurificationConfig, "search the purifier's step size, noise and steps (Ray Tune, Optuna, ASHA)"),
    "tune-training": (TuneTrainingConfig, "search the training sampler's step size, noise and steps"),
    "quickstart": (QuickstartConfig, "train a small EBM, then attack the ResNet-20 undefended and defended"),
}


# the one-process commands (no Ray): what each runs
LOCAL = {
    "attack-local": "run an attack config in one process on one device, without Ray, MLflow or s3fs",
    "train-ebm-gpu": "train the EBM in one process within a time budget, resumable from a compact checkpoint (no Ray)",
}
OVERRIDES = "dotted key=value overrides, anywhere on the line, e.g. attack.steps=10"
USAGE = "%(prog)s [options] [key=value ...]"


def parser() -> argparse.ArgumentParser:
    """Every command's options; the key=value overrides are what is left over (`overrides`)."""
    p = argparse.ArgumentParser(prog="debm", description="distributed-ebm: EBM adversarial purification",
                                epilog=OVERRIDES)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text, epilog=OVERRIDES, usage=USAGE)
        s.add_argument("--config", help="YAML config (defaults: the paper's settings)")
        s.add_argument("--print-config", action="store_true", help="print the validated config and exit")
        s.add_argument("--verbose", action="store_true", help="also print Ray's, Ray Train's and Ray Data's own logs")
    a = sub.add_parser("attack-local", help=LOCAL["attack-local"], description=LOCAL["attack-local"], epilog=OVERRIDES,
                       usage=USAGE)
    a.add_argument("--config", required=True, help="attack YAML (e.g. jobs/configs/attack_mefa.yaml)")
    a.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    t = sub.add_parser("train-ebm-gpu", help=LOCAL["train-ebm-gpu"], description=LOCAL["train-ebm-gpu"],
                       epilog=OVERRIDES, usage=USAGE)
    t.add_argument("--config", help="training YAML (e.g. jobs/configs/train_ebm_cifar10.yaml)")
    t.add_argument("--minutes", type=float, help="wall-clock budget of this session, from the start, saves included")
    t.add_argument("--resume", metavar="CKPT", help="a training checkpoint to continue from (ckpt.pt; its bank-0.pt "
                                                    "is used where it lies beside it, else the bank is re-burned)")
    t.add_argument("--out", metavar="DIR", help="where ckpt.pt, the sample grid, curves.png and README.md go")
    t.add_argument("--keep-bank", action="store_true", help="also write the bank (bank-0.pt, 600 MB for the paper's "
                                                            "50,000 chains) beside ckpt.pt, for an exact resume")
    t.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when present)")
    t.add_argument("--iterations", type=int, help="stop at this iteration (default: the config's `iterations`)")
    t.add_argument("--card", metavar="DIR", help="only rewrite DIR/README.md and DIR/curves.png from DIR/ckpt.pt")
    r = sub.add_parser("report", help="print the accuracy table of one or more attack results folders")
    r.add_argument("urls", nargs="+", metavar="URL", help="attack output folders (local or s3://)")
    r.add_argument("--plot", metavar="URL", help="also write their accuracy curves, in one PNG, here")
    r.add_argument("--gallery", type=int, metavar="N", help="also draw each run's gallery.png of its first N images "
                                                           "by id (from its records and its config)")
    add_import_parser(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, its key=value overrides taken wherever they stand (`args.overrides`): argparse's own
    positional list takes one unbroken run of them, refusing `trials=3 --print-config rungs=[25,50]`. An
    unknown option left over is one line and exit 2."""
    p = parser()
    args, rest = p.parse_known_args(argv)
    if args.command in ("report", "import"):
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        return args
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        p.exit(2, f"debm {args.command}: {unknown[0]!r} is not an option of debm {args.command} "
                  f"(see debm {args.command} --help); overrides are key=value\n")
    args.overrides = rest
    return args
def add_import_parser(sub) -> None:
    from .method.nets.formats import FORMATS
    names = sorted({f.name for f in FORMATS} - {"debm", "export"})
    i = sub.add_parser("import", help="write a released EBM or classifier as this project's checkpoint "
                                      "(docs/models.md lists the formats)")
    i.add_argument("url", metavar="URL", help="the released file (local or s3://)")
    i.add_argument("--format", required=True, choices=names, help="the source's format")
    i.add_argument("--out", required=True, metavar="URL", help="where the checkpoint goes (a model card beside it)")
    i.add_argument("--activation", choices=["soft_lrelu", "silu"], help="MEFA's activation (required for mefa)")


def import_command(args) -> int:
    from .store.released import import_model
    try:
        done = import_model(args.url, args.format, args.out, args.activation)
    except (InputError, FileNotFoundError) as err:
        print(f"debm import: {err}", file=sys.stderr)
        return 2
    print(f"{done['role']} from {args.url} ({args.format}, sha256 {done['source']['sha256'][:16]}): "
          f"{done['out']} (card: {done['card']})")
    return 0


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
        print(f"classifier trained to epoch {out['epoch']}: {out['classifier']} (test accuracy "
              f"{out.get('test_accuracy')})")
    elif command == "attack":
        from .distributed.attack import RayActors
        from .recipes.attack import run_attack
        from .results.report import attack_done
        print(attack_done(run_attack(cfg, RayActors()), cfg.output))
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


def attack_local(args: argparse.Namespace) -> None:
    """`debm attack-local`: the attack's one recipe (`recipes.attack.run_attack`) on the one-device executor:
    the same records, summary and plot as `debm attack`, resumable the same way, under `output`; nothing is
    logged to MLflow."""
    from .local.attack import OneProcess
    from .method.devices import job_device
    from .recipes.attack import run_attack
    from .results.report import attack_done

    cfg = load_config(AttackConfig, args.config, args.overrides)
    device = job_device(args.device)
    print(f"attack-local: {cfg.attack.name} on {device}, output {cfg.output}", flush=True)
    summary = run_attack(cfg, OneProcess(device))
    print(attack_done(summary, cfg.output))


def train_ebm_gpu(args: argparse.Namespace, started: float) -> None:
    """`debm train-ebm-gpu`: one session of `local.train.LocalTraining` that trains for `--minutes` (counted
    from `started`), then leaves in `--out` the compact checkpoint, a sample grid of the bank, the loss and
    energy curves and the model card; the next session, on any machine, continues with `--resume`,
    re-burning the bank where it did not travel. `--card DIR` only rewrites DIR's card."""
    import torch

    from .config import StandaloneTrainConfig
    from .local.train import LocalTraining, device_name
    from .method.devices import job_device
    from .method.training import TrainingDiverged
    from .results.card import write_card
    from .store import storage
    from .store.checkpoints import CKPT, check_fingerprint, load_checkpoint, settings_fingerprint
    from .store.data import read_images

    if args.card:
        write_card(args.card, load_checkpoint(storage.join(args.card, CKPT)))
        print(f"wrote {storage.join(args.card, 'README.md')}")
        return
    if args.minutes is None or not 0 < args.minutes <= 24 * 60:
        raise InputError(f"--minutes must be in (0, 1440] (got {args.minutes})")
    if not args.out:
        raise InputError("--out DIR is required (where the checkpoint and the card go)")
    storage.check_destination(args.out, "--out", folder=True)
    cfg = load_config(StandaloneTrainConfig, args.config, args.overrides)
    iterations = cfg.iterations if args.iterations is None else args.iterations
    if not 1 <= iterations <= cfg.iterations:
        raise InputError(f"--iterations must be in [1, {cfg.iterations}] (got {iterations})")
    device = job_device(args.device)
    state = None
    if args.resume:
        state = load_checkpoint(args.resume)
        check_fingerprint(state["training"]["fingerprint"], settings_fingerprint(cfg), args.resume)
    data = read_images(cfg.data)
    print(f"train-ebm-gpu: {len(data)} images, {device_name(device)}, torch {torch.__version__}, "
          f"{args.minutes} min", flush=True)
    session = LocalTraining(cfg, data, args.out, device, state, _parent(args.resume) if args.resume else None,
                            args.keep_bank, card=True, minutes=args.minutes, log=lambda s: print(s, flush=True),
                            started=started)
    try:
        record = session.run(iterations, started + 60 * args.minutes, name="train-ebm-gpu")
    except TrainingDiverged as err:
        raise TrainingDiverged(f"{err}; the last good checkpoint is the last one saved in {args.out}") from None
    rate = record["iterations_per_second"]
    print(f"session {record['session']}: iterations {record['start_iteration']} -> {record['end_iteration']} in "
          f"{record['seconds'] / 60:.2f} min on {record['device']} ({rate or 0:.3g} it/s); wrote {args.out}/",
          flush=True)


def _parent(url: str) -> str:
    """The folder a file URL lies in."""
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the one-GPU session's --minutes count from here
    args = parse_args(argv)
    if args.command == "import":
        return import_command(args)
    if args.command == "report":
        from .results.records import load_summary, paired_comparison, worst_case_over_runs
        from .results.report import (
            defense_key,
            format_paired,
            format_table,
            format_worst_over_runs,
            plot_curves,
            system_and_attack_labels,
        )
        from .store import storage
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
                from .recipes.attack import draw_gallery

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
    if args.command == "attack-local":
        return run_job("debm attack-local", lambda: attack_local(args))
    if args.command == "train-ebm-gpu":
        return run_job("debm train-ebm-gpu", lambda: train_ebm_gpu(args, started))
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

    return run_job(f"debm {args.command}", job)

def ray_running() -> bool:
    """Whether this process is connected to a Ray (without importing Ray)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":
    sys.exit(main())
