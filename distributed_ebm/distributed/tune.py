"""Ray Tune search over the purifier's step size, noise and steps, judged on held-out training images.

Each trial runs the attack job's own evaluation engine (`evaluate`: Ray Data actors, resumable
records) on a growing number of validation images, one ASHA rung per size, so weak settings stop
early and the images a trial already attacked are not attacked again. Optuna proposes the
settings. The objective ranks every trial whose natural accuracy reaches the floor above every
trial that misses it. MLflow: a parent run for the search and a child run per trial. The best
settings are written as a complete attack config that `jobs/attack.py` accepts as it is.
"""
from __future__ import annotations

import json
import os

from .. import storage
from ..config import AttackConfig, TunePurificationConfig, to_yaml
from ..data import load
from .cluster import available, connect
from .evaluate import evaluate, preflight
from .trainer import run_dir

BEST, TRIALS = "best_attack.yaml", "trials.json"


def objective(kind: str, natural: float, robust: float, floor: float) -> float:
    """robust_with_floor: robust accuracy when natural >= floor, else natural - 1 (below all of those)."""
    if kind == "robust":
        return robust
    if kind == "natural":
        return natural
    return robust if natural >= floor else natural - 1.0


def trial_attack(cfg: TunePurificationConfig, params: dict, ids: list[int], output: str) -> AttackConfig:
    """The attack config of one trial on these validation images."""
    purify = cfg.attack.purify.model_copy(update={k: (int(round(v)) if k == "steps" else float(v))
                                                   for k, v in params.items()})
    data = cfg.validation.model_copy(update={"indices": ids, "count": None, "random": None})
    return cfg.attack.model_copy(update={"purify": purify, "data": data, "output": output,
                                         "mlflow": cfg.attack.mlflow.model_copy(update={"enabled": False})})


def run_trial(params: dict, setup: dict) -> None:
    """A Tune trial: evaluate on each rung's validation images, report after each rung."""
    from ray import tune

    cfg = TunePurificationConfig.model_validate(setup["cfg"])
    trial_id = tune.get_context().get_trial_id()
    out = storage.join(run_dir(cfg), "trials", trial_id)
    logger = None
    if setup.get("mlflow"):
        from ..tracking import RunLogger
        logger = RunLogger.child(**setup["mlflow"], name=trial_id, params=params)
    for rung, n in enumerate(cfg.rungs, start=1):
        summary = evaluate(trial_attack(cfg, params, setup["ids"][:n], out), show=False)
        nat, rob = summary["natural_accuracy"], summary["robust_accuracy"]
        metrics = {"objective": objective(cfg.objective, nat, rob, cfg.natural_floor), "natural_accuracy": nat,
                   "robust_accuracy": rob, "images": n, "image_steps_per_second": summary["image_steps_per_second"] or 0}
        if logger:
            logger.metrics(metrics, step=rung)
        tune.report(metrics)


def search_space(cfg: TunePurificationConfig) -> dict:
    from ray import tune

    space = {}
    for name, r in cfg.space.items():
        if name == "steps":
            space[name] = tune.lograndint(int(r.low), int(r.high) + 1) if r.log else tune.randint(int(r.low), int(r.high) + 1)
        else:
            space[name] = tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)
    return space


def tune_purification(cfg: TunePurificationConfig) -> dict:
    """Run (or resume) the search; returns the best trial's settings and metrics, and the best-settings file."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    validation = load(cfg.validation)
    ids = validation.ids.tolist()
    if len(ids) < cfg.rungs[-1]:
        from ..config import InputError
        raise InputError(f"rungs go up to {cfg.rungs[-1]} images but validation holds {len(ids)}")
    preflight(trial_attack(cfg, {}, ids[:1], storage.join(run_dir(cfg), "preflight")))  # weights, sizes
    connect(cfg.attack.ray.address)
    per_trial = (cfg.attack.ray.actors or 1) * cfg.attack.ray.cpus_per_actor
    concurrent = cfg.max_concurrent or max(1, int(available("CPU") // per_trial))
    setup = {"cfg": cfg.model_dump(mode="json"), "ids": ids}
    storage_path = cfg.output if "://" in cfg.output else os.path.abspath(cfg.output)
    path = storage.join(storage_path, cfg.name)

    def tuner(mlflow_setup):
        # a trial is a light driver (0.01 CPU); its evaluation's actors ask for their own resources
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup={**setup, "mlflow": mlflow_setup}),
                                        {"cpu": 0.01})
        if tune.Tuner.can_restore(path):  # a stopped search resumes
            return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        return tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric="objective", mode="max", num_samples=cfg.trials, max_concurrent_trials=concurrent,
                search_alg=OptunaSearch(seed=cfg.seed),
                scheduler=ASHAScheduler(max_t=len(cfg.rungs), grace_period=1, reduction_factor=cfg.reduction_factor)),
            run_config=tune.RunConfig(name=cfg.name, storage_path=storage_path))

    if cfg.mlflow.enabled:
        from ..tracking import mlflow_run, tracking_uri
        id_url = storage.join(run_dir(cfg), "mlflow_run_id")
        run_id = storage.read_bytes(id_url).decode().strip() if storage.exists(id_url) else None
        with mlflow_run(cfg.mlflow, f"tune:{cfg.name}", cfg.model_dump(mode="json"),
                        tags={"job": "tune-purification"}, run_id=run_id) as mlflow:
            parent = mlflow.active_run()
            storage.write_bytes(id_url, parent.info.run_id.encode())
            results = tuner({"uri": tracking_uri(cfg.mlflow), "parent_run_id": parent.info.run_id,
                             "experiment_id": parent.info.experiment_id}).fit()
            best = _finish(cfg, results)
            mlflow.log_params({f"best.{k}": v for k, v in best["params"].items()})
            mlflow.log_metrics({f"best_{k}": v for k, v in best["metrics"].items() if isinstance(v, (int, float))})
            mlflow.log_artifact(_local_copy(best["file"]))
    else:
        best = _finish(cfg, tuner(None).fit())
    return best


def _local_copy(url: str) -> str:
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), os.path.basename(url))
    with open(path, "wb") as f:
        f.write(storage.read_bytes(url))
    return path


def _finish(cfg: TunePurificationConfig, results) -> dict:
    """Write trials.json and the best-settings attack config; return the best trial."""
    rows = []
    for r in results:
        if r.metrics:
            rows.append({"trial": r.metrics.get("trial_id"), "params": r.config,
                         "rungs": r.metrics.get("training_iteration"),
                         **{k: r.metrics.get(k) for k in ("objective", "natural_accuracy", "robust_accuracy", "images")}})
    errors = [r.error for r in results if r.error]
    if not rows:
        raise RuntimeError(f"no trial finished; first error: {errors[0] if errors else 'none'}")
    best = results.get_best_result(metric="objective", mode="max", scope="last")
    best_attack = cfg.attack.model_copy(update={"purify": trial_attack(cfg, best.config, [0], "x").purify})
    file = storage.join(run_dir(cfg), BEST)
    storage.write_bytes(file, (f"# best purifier settings of search {cfg.name} (objective {cfg.objective}, "
                               f"natural floor {cfg.natural_floor}); run with jobs/attack.py --config\n"
                               + to_yaml(best_attack)).encode())
    storage.write_bytes(storage.join(run_dir(cfg), TRIALS), json.dumps(rows, indent=2).encode())
    return {"params": best.config, "metrics": {k: best.metrics.get(k) for k in
                                               ("objective", "natural_accuracy", "robust_accuracy", "images")},
            "file": file, "trials": rows, "stopped_early": sum(1 for r in rows if r["rungs"] < len(cfg.rungs))}
