"""Ray Tune searches, judged on exact test images disjoint by id from the evaluation's (by default ids
500-999 for the search, 0-499, the paper's 500, for the tuned config), or on training images where
`validation_images: training` says so (optimistic: the classifier and the EBM learned from them).

- `tune_purification`: the purifier's step size, noise and steps. Each trial runs the attack
  job's own recipe on its Ray executor (`run_attack` on `RayActors`: resumable records) on a growing number
  of validation images, one ASHA rung per size, so weak settings stop early and no image is
  attacked twice.
- `tune_training`: the training sampler's step size, noise and steps. Each trial is a driver that
  fits the training job's TorchTrainer (`train_ebm_on_ray`, with the validation ids held out of
  the training data) up to each rung's iteration count, resuming its own run, and evaluates the
  EBM as a purifier after each rung.

Optuna proposes, ASHA prunes. The objective ranks every trial whose natural accuracy (`natural_figure`: the defense's
own by default, or the protocol's) reaches the floor above every trial that misses it. MLflow: a parent run
per search, a child run per trial.
The search state lives under output/name (local or S3); running the job again resumes it. The best
settings are written as a config the attack (or training) job accepts as it is.
"""
from __future__ import annotations

import json
import os
import sys

from ..config import AttackConfig, SearchConfig, TrainEBMConfig, TunePurificationConfig, TuneTrainingConfig, to_yaml
from ..errors import InputError
from ..recipes.attack import preflight, run_attack
from ..recipes.training import preflight_ebm
from ..store import storage
from ..store.data import catalog, read_images
from ..store.released import load_classifier_as
from ..store.tracking import check_tracking
from .attack import RayActors
from .cluster import available, check_one_storage, check_tracking_reach, connect
from .devices import capacity, cluster_plan, pool_limit, ready
from .ray_train import SafeLogger, run_dir

BEST_ATTACK, BEST_TRAINING, TRIALS = "best_attack.yaml", "best_training.yaml", "trials.json"
REPORTED = ("objective", "natural_defense_accuracy", "natural_protocol_accuracy", "robust_accuracy", "images")


def objective(kind: str, natural: float, robust: float, floor: float) -> float:
    """robust_with_floor: robust accuracy when natural >= floor, else natural - 1 (below all of those)."""
    if kind == "robust":
        return robust
    if kind == "natural":
        return natural
    return robust if natural >= floor else natural - 1.0


def with_params(section, params: dict):
    """A Langevin section with a trial's values (`steps` rounded to an integer)."""
    return section.model_copy(update={k: (int(round(v)) if k == "steps" else float(v)) for k, v in params.items()})


def trial_attack(cfg: SearchConfig, ids: list[int], output: str, purify=None, ebm: str | None = None) -> AttackConfig:
    """The evaluation of one trial on these validation images (the trial logs to MLflow itself)."""
    update = {"data": cfg.validation.model_copy(update={"indices": ids, "count": None, "random": None}),
              "output": output, "mlflow": cfg.attack.mlflow.model_copy(update={"enabled": False}),
              "report": cfg.attack.report.model_copy(update={"gallery": 0})}  # a trial's pictures help no one
    if purify is not None:
        update["purify"] = purify
    if ebm is not None:
        update["ebm"] = ebm
    return cfg.attack.model_copy(update=update)


def _scores(cfg: SearchConfig, summary: dict, images: int) -> dict:
    nat, rob = summary[f"natural_{cfg.natural_figure}_accuracy"], summary["robust_accuracy"]
    return {"objective": objective(cfg.objective, nat, rob, cfg.natural_floor),
            **{k: summary[k] for k in ("natural_defense_accuracy", "natural_protocol_accuracy")},
            "robust_accuracy": rob, "images": images}


def _child_logger(setup: dict, trial_id: str, params: dict):
    if not setup.get("mlflow"):
        return None
    from ..store.tracking import RunLogger
    return SafeLogger(lambda: RunLogger.child(**setup["mlflow"], name=trial_id, params=params))


def purification_trial(params: dict, setup: dict) -> None:
    """Evaluate the trial's purifier on each rung's validation images; report after each rung."""
    from ray import tune

    cfg = TunePurificationConfig.model_validate(setup["cfg"])
    trial_id = tune.get_context().get_trial_id()
    out = storage.join(run_dir(cfg), "trials", trial_id)
    logger = _child_logger(setup, trial_id, params)
    purify = with_params(cfg.attack.purify, params)
    for rung, n in enumerate(cfg.rungs, start=1):
        metrics = _scores(cfg, run_attack(trial_attack(cfg, setup["ids"][:n], out, purify), RayActors(), show=False), n)
        if logger:
            logger.metrics(metrics, step=rung)
        tune.report(metrics)


def trial_training(cfg: TuneTrainingConfig, params: dict, output: str, held_out: list[int]) -> TrainEBMConfig:
    """The training job of one trial: its Langevin settings, its own run, the validation ids held out."""
    data = cfg.train.data.model_copy(update={"exclude": sorted(set(cfg.train.data.exclude or []) | set(held_out))})
    return cfg.train.model_copy(update={
        "langevin": with_params(cfg.train.langevin, params), "data": data, "output": output,
        "mlflow": cfg.train.mlflow.model_copy(update={"enabled": False})})


def training_trial(params: dict, setup: dict) -> None:
    """Train with the trial's sampler up to each rung's iterations (resuming), then evaluate the EBM."""
    from ray import tune

    from .train import train_ebm_on_ray

    cfg = TuneTrainingConfig.model_validate(setup["cfg"])
    trial_id = tune.get_context().get_trial_id()
    out = storage.join(run_dir(cfg), "trials", trial_id)
    logger = _child_logger(setup, trial_id, params)
    held_out = setup["ids"] if cfg.validation_images == "training" else []  # test images are never trained on
    train = trial_training(cfg, params, out, held_out).model_copy(update={"name": f"ebm-{trial_id}"})
    for rung, iterations in enumerate(cfg.rungs, start=1):
        trained = train_ebm_on_ray(train.model_copy(update={"iterations": iterations}), show=False)
        attack = trial_attack(cfg, setup["ids"], storage.join(out, f"eval-{iterations}"), ebm=trained["ebm"])
        summary = run_attack(attack, RayActors(), show=False)
        metrics = {**_scores(cfg, summary, len(setup["ids"])), "iterations": iterations,
                   "energy_diff": trained.get("energy_diff", float("nan"))}
        if logger:
            logger.metrics(metrics, step=rung)
        tune.report(metrics)


def search_space(cfg: SearchConfig) -> dict:
    from ray import tune

    space = {}
    for name, r in cfg.space.items():
        if name == "steps":
            space[name] = (tune.lograndint(int(r.low), int(r.high) + 1) if r.log
                           else tune.randint(int(r.low), int(r.high) + 1))
        else:
            space[name] = tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)
    return space


def run_search(cfg: SearchConfig, trial, setup: dict, per_trial_cpus: float, job: str, write_best) -> dict:
    """Optuna + ASHA over `trial`, resumable from output/name, inside a parent MLflow run."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    connect(cfg.attack.ray.address)
    check_one_storage(cfg.output, "output", cfg.attack.ray.shared_filesystem)
    if cfg.mlflow.enabled:  # trials log from whichever node they run on
        from ..store.tracking import tracking_uri
        check_tracking_reach(tracking_uri(cfg.mlflow), cfg.attack.ray.shared_filesystem)
    gpus = _trial_gpus(cfg)  # GPUs bound a trial as CPUs do: a GPU node's few CPUs would admit too many
    concurrent = cfg.max_concurrent or max(1, min(int(available("CPU") // per_trial_cpus),
                                                  int(available("GPU") // gpus) if gpus else 1 << 30))
    cfg, actors = share_the_cluster(cfg, concurrent)
    setup = {**setup, "cfg": cfg.model_dump(mode="json")}
    r = cfg.attack.ray
    print(f"{job}: {cfg.trials} trials, {concurrent} at a time, each evaluating with {actors} attack actor(s) "
          f"({r.cpus_per_actor:g} CPU{f', {r.gpus_per_actor:g} GPU' if r.gpus_per_actor else ''} each)",
          file=sys.stderr, flush=True)
    storage_path = cfg.output if "://" in cfg.output else os.path.abspath(cfg.output)
    path = storage.join(storage_path, cfg.name)

    def make_tuner(mlflow_setup):
        # a trial is a light driver (0.01 CPU); the actors and workers it starts ask for their own resources
        trainable = tune.with_resources(tune.with_parameters(trial, setup={**setup, "mlflow": mlflow_setup}),
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

    if not cfg.mlflow.enabled:
        return _finish(cfg, make_tuner(None).fit(), write_best)
    from ..store.tracking import log_url_artifacts, mlflow_run, tracking_uri

    id_url = storage.join(run_dir(cfg), "mlflow_run_id")
    run_id = storage.read_bytes(id_url).decode().strip() if storage.exists(id_url) else None
    with mlflow_run(cfg.mlflow, f"{job}:{cfg.name}", cfg.model_dump(mode="json"), tags={"job": job},
                    run_id=run_id) as mlflow:
        parent = mlflow.active_run()
        storage.write_bytes(id_url, parent.info.run_id.encode())
        best = _finish(cfg, make_tuner({"uri": tracking_uri(cfg.mlflow), "parent_run_id": parent.info.run_id,
                                        "experiment_id": parent.info.experiment_id}).fit(), write_best)
        mlflow.log_params({f"best.{k}": v for k, v in best["params"].items()})
        mlflow.log_metrics({f"best_{k}": v for k, v in best["metrics"].items() if v is not None})
        log_url_artifacts(mlflow, [best["file"]])
    return best


def _trial_gpus(cfg: SearchConfig) -> float:
    """The GPUs one trial's training workers or attack actors take where the cluster runs them on GPUs."""
    if isinstance(cfg, TuneTrainingConfig):
        r = cfg.train.ray
        return r.workers * cluster_plan(None if r.use_gpu is None else float(r.use_gpu), "train.ray.use_gpu").gpus
    r = cfg.attack.ray
    return (r.actors or 1) * cluster_plan(r.gpus_per_actor, "attack.ray.gpus_per_actor").gpus


def share_the_cluster(cfg: SearchConfig, concurrent: int) -> tuple[SearchConfig, int]:
    """Each of `concurrent` trials gets its share of the attack actors the cluster can hold (unless attack.ray.actors
    names them) as its pool's most, so that concurrent trials, each growing its pool to the whole cluster, do not
    starve each other. The cluster's most: its alive nodes and those its autoscaler may add, else what fits now."""
    if cfg.attack.ray.actors is not None:
        return cfg, cfg.attack.ray.actors
    r = cfg.attack.ray
    gpus = cluster_plan(r.gpus_per_actor, "attack.ray.gpus_per_actor").gpus
    ready(r.cpus_per_actor, gpus, {"CPU": "attack.ray.cpus_per_actor", "GPU": "attack.ray.gpus_per_actor"},
          r.provision_timeout_s, "tune")  # what no node can hold refused before any trial, the first node waited for
    fit = int(available("GPU") // gpus) if gpus else int(available("CPU") // r.cpus_per_actor)
    most = pool_limit({"CPU": r.cpus_per_actor, "GPU": gpus}, capacity()) or fit
    actors = max(1, most // concurrent)
    ray_cfg = cfg.attack.ray.model_copy(update={"actors": actors, "gpus_per_actor": gpus})
    return cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"ray": ray_cfg})}), actors


def _finish(cfg: SearchConfig, results, write_best) -> dict:
    """Write trials.json and the best-settings file; return the best trial and every trial's last metrics."""
    rows = [{"trial": r.metrics.get("trial_id"), "params": r.config, "rungs": r.metrics.get("training_iteration"),
             **{k: r.metrics.get(k) for k in REPORTED}} for r in results if r.metrics]
    if not rows:
        errors = [r.error for r in results if r.error]
        raise RuntimeError(f"no trial reported; first error: {errors[0] if errors else 'none'}")
    rows.sort(key=lambda row: row["trial"])
    best = best_trial(rows)
    file = write_best(best["params"])
    storage.write_bytes(storage.join(run_dir(cfg), TRIALS), json.dumps(rows, indent=2).encode())
    return {"params": best["params"], "metrics": {k: best[k] for k in REPORTED}, "file": file,
            "trials": rows, "stopped_early": sum(1 for r in rows if r["rungs"] < len(cfg.rungs))}


def best_trial(rows: list[dict]) -> dict:
    """The trial that reached the most rungs, then the highest objective there, then the first by id: a trial
    that ASHA stopped early (scored on fewer images) never wins over one that saw every rung, and ties go the
    same way however the trials are listed (a rerun of a finished search picks the same best)."""
    return min(rows, key=lambda row: (-row["rungs"], -row["objective"], row["trial"]))


def _write(cfg: SearchConfig, name: str, what: str, body) -> str:
    file = storage.join(run_dir(cfg), name)
    storage.write_bytes(file, (f"# best {what} of search {cfg.name} (objective {cfg.objective}, natural floor "
                               f"{cfg.natural_floor})\n" + to_yaml(body)).encode())
    return file


def _validation_ids(cfg: SearchConfig, needed: int) -> list[int]:
    """The search's image ids (ids alone: the trials' engines read the pixels); none may be an evaluation image."""
    ids = catalog(cfg.validation).ids.tolist()
    if len(ids) < needed:
        raise InputError(f"the search needs {needed} validation images but validation holds {len(ids)}")
    if cfg.validation.path == cfg.attack.data.path:
        shared_ids = sorted(set(ids) & set(catalog(cfg.attack.data).ids.tolist()))
        if shared_ids:
            raise InputError(f"validation shares {len(shared_ids)} image ids with attack.data (e.g. {shared_ids[:5]}): "
                             "a search must not see the images its tuned settings are evaluated on "
                             "(validation.id_range and attack.data.id_range choose disjoint ids)")
    return ids


def _search_preflight(cfg: SearchConfig) -> None:
    storage.check_destination(cfg.output, "output", folder=True)
    check_tracking(cfg.mlflow)


def tune_purification(cfg: TunePurificationConfig) -> dict:
    """Search the purifier; the best settings become a complete attack config (run it with jobs/attack.py)."""
    ids = _validation_ids(cfg, cfg.rungs[-1])
    _search_preflight(cfg)
    trial = trial_attack(cfg, ids[:1], storage.join(run_dir(cfg), "preflight"))
    preflight(trial, catalog(trial.data))  # weights, sizes: before any trial
    per_trial = (cfg.attack.ray.actors or 1) * cfg.attack.ray.cpus_per_actor
    return run_search(cfg, purification_trial, {"ids": ids}, per_trial,
                      "tune-purification",
                      lambda params: _write(cfg, BEST_ATTACK,
                                            "purifier settings; run: python jobs/attack.py --config THIS",
                                            cfg.attack.model_copy(
                                                update={"purify": with_params(cfg.attack.purify, params)})))


def tune_training(cfg: TuneTrainingConfig) -> dict:
    """Search the training sampler; the best settings become a complete training config (jobs/train_ebm.py)."""
    ids = _validation_ids(cfg, 1)
    data = read_images(trial_training(cfg, {}, "x", ids).data)
    _search_preflight(cfg)
    preflight_ebm(cfg.train, data)
    c = cfg.attack.classifier
    load_classifier_as(c)  # before any trial
    per_trial = cfg.train.ray.workers * cfg.train.ray.cpus_per_worker
    return run_search(cfg, training_trial, {"ids": ids}, per_trial, "tune-training",
                      lambda params: _write(cfg, BEST_TRAINING,
                                            "training sampler; run: python jobs/train_ebm.py --config THIS",
                                            cfg.train.model_copy(
                                                update={"langevin": with_params(cfg.train.langevin, params)})))
