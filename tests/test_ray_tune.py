"""The purifier search on a real local Ray (2 CPUs) with a real MLflow store."""
import os
import subprocess
import sys

import pytest
import yaml

from distributed_ebm.config import AttackConfig, TunePurificationConfig, build, load_config
from distributed_ebm.distributed.ray_train import run_dir
from distributed_ebm.distributed.tune import TRIALS, objective, tune_purification
from distributed_ebm.errors import ConfigError
from distributed_ebm.results import records as results
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import save_ebm
from distributed_ebm.store.data import read_images

from .conftest import RESNET20, TEST_EXACT, tiny_ebm


def test_objective_ranks_every_trial_below_the_floor_under_every_trial_above():
    above = [objective("robust_with_floor", n, r, 0.7) for n, r in ((0.7, 0.0), (0.9, 0.3), (1.0, 1.0))]
    below = [objective("robust_with_floor", n, r, 0.7) for n, r in ((0.69, 0.69), (0.1, 1.0), (0.0, 0.0))]
    assert min(above) > max(below)
    assert objective("robust", 0.1, 0.4, 0.7) == 0.4 and objective("natural", 0.1, 0.4, 0.7) == 0.1


def test_the_best_trial_saw_every_rung_and_ties_go_to_the_first_trial():
    """The best trial is one scored on every rung, never one ASHA stopped early (Ray's
    `get_best_result(scope='last')` may pick that), and ties go to the first trial, not to a listing order that
    differs after a restore: a rerun of a finished search logs the same best, which MLflow requires ("Changing
    param values is not allowed")."""
    from distributed_ebm.distributed.tune import best_trial

    def row(trial, rungs, objective):
        return {"trial": trial, "rungs": rungs, "objective": objective}
    rows = [row("t_00002", 2, 0.5), row("t_00001", 1, 1.0), row("t_00003", 2, 0.5), row("t_00000", 2, 0.25)]
    assert best_trial(rows)["trial"] == "t_00002"  # not the early-stopped t_00001, whatever its score
    assert best_trial(rows[::-1])["trial"] == "t_00002"  # ties: the first trial by id, in any order


@pytest.mark.parametrize("override, message", [
    ("space={step_size: null, noise: null, steps: null}",
     "space is empty: name at least one of steps, step_size, noise"),
    ("space={noise: {low: 0.1, high: 0.01}}", "space.noise: low 0.1 > high 0.01"),
    ("space={temperature: {low: 0.1, high: 1}}",
     "space.temperature: unknown parameter; searchable: steps, step_size, noise"),
    ("space={noise: {low: 0, high: 1}}", "space.noise: a log-uniform range needs low > 0"),
    ("validation.split=train", "validation_images = held_out_test: validation.split must be test"),
    ("validation_images=training", "validation_images = training: validation must be a training-split file"),
    ("rungs=[10, 5]", "rungs must grow strictly"),
])
def test_bad_search_spaces_fail_before_any_trial(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TunePurificationConfig, None, [override])
    assert message in str(err.value)


def test_tiny_search_runs_stops_trials_early_and_writes_a_runnable_best_file(ray_local, tmp_path):
    import mlflow
    ebm = str(tmp_path / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), ebm)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build(TunePurificationConfig, {
        "attack": {"data": {"path": TEST_EXACT, "count": 2}, "classifier": {"weights": RESNET20}, "ebm": ebm,
                   "purify": {"steps": 2}, "attack": {"steps": 2, "eot_attack": 2, "eot_defense": 3, "eps": "2/255"},
                   "batch_size": 4, "ray": {"actors": 1}, "output": str(tmp_path / "best-run"),
                   "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp_path / "art"), "experiment": "best"}},
        "validation": {"random": 4, "subset_seed": 1},
        "space": {"noise": {"low": 0.001, "high": 3.0}, "steps": {"low": 1, "high": 4}, "step_size": None},
        # 2 trials, the fewest that show a stop: Optuna's seed 38 draws noise 0.022, then 1.92, which ASHA stops
        # after rung 1
        "rungs": [2, 4], "trials": 2, "max_concurrent": 1, "seed": 38,
        "output": str(tmp_path / "search"), "name": "tiny",
        "mlflow": {"tracking_uri": uri, "artifact_location": str(tmp_path / "art"), "experiment": "search"}})
    best = tune_purification(cfg)
    assert len(best["trials"]) == 2
    assert best["stopped_early"] >= 1, best["trials"]
    assert best["metrics"]["objective"] == max(t["objective"] for t in best["trials"] if t["rungs"] == 2)

    # the trials saw only validation images: exact test images of ids 500-999, none of the evaluation's
    validation = set(read_images(cfg.validation).ids.tolist())
    seen = set()
    for trial in best["trials"]:
        seen |= set(results.read_records(storage.join(run_dir(cfg), "trials", trial["trial"]),
                                         ["index"]).column("index").to_pylist())
    assert seen <= validation and min(validation) >= 500 and len(validation) == 4
    assert not seen & set(read_images(cfg.attack.data).ids.tolist())
    assert best["metrics"]["natural_defense_accuracy"] is not None
    assert best["metrics"]["natural_protocol_accuracy"] is not None

    # MLflow: the search's parent run and one child run per trial
    mlflow.set_tracking_uri(uri)
    (parent,) = mlflow.search_runs(experiment_names=["search"], filter_string="tags.job = 'tune-purification'",
                                   output_format="list")
    children = mlflow.search_runs(experiment_names=["search"],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  output_format="list")
    assert sorted(c.data.tags["trial"] for c in children) == sorted(t["trial"] for t in best["trials"])
    assert storage.exists(storage.join(run_dir(cfg), TRIALS))

    # the best-settings file is a complete attack config (tests/test_e2e_cluster.py runs it, from S3, as a job)
    tuned = build(AttackConfig, yaml.safe_load(storage.read_bytes(best["file"])))
    assert tuned.purify.steps == best["params"]["steps"]
    assert tuned.purify.noise == pytest.approx(best["params"]["noise"])
    assert tuned.output == str(tmp_path / "best-run") and tuned.data.count == 2

    # running the search again restores it from its storage instead of starting new trials
    again = tune_purification(cfg)
    assert sorted(t["trial"] for t in again["trials"]) == sorted(t["trial"] for t in best["trials"])


def test_training_sampler_search_holds_out_validation_and_writes_a_training_config(ray_local, tmp_path):
    from distributed_ebm.config import TrainEBMConfig, TuneTrainingConfig
    from distributed_ebm.distributed.tune import trial_training, tune_training

    exact_train = TEST_EXACT.replace("test-exact-1000", "train-exact-4000")
    cfg = build(TuneTrainingConfig, {
        "train": {"data": {"path": exact_train, "random": 64}, "ebm": {"width": 4}, "langevin": {"steps": 2},
                  "batch_size": 8, "bank_size": 16, "checkpoint_every": 2, "log_every": 2,
                  "ray": {"workers": 1}},
        "attack": {"classifier": {"weights": RESNET20}, "purify": {"steps": 2},
                   "attack": {"steps": 1, "eot_attack": 2, "eot_defense": 2}, "batch_size": 4, "ray": {"actors": 1}},
        "validation": {"path": exact_train, "split": "train", "random": 4, "subset_seed": 1, "id_range": None},
        "validation_images": "training",  # the named option: held out of each trial's training data
        "space": {"noise": {"low": 0.001, "high": 0.1}, "steps": {"low": 1, "high": 3}},
        "rungs": [2], "trials": 1, "max_concurrent": 1, "output": str(tmp_path / "search"), "name": "tt",
        "mlflow": {"enabled": False}})
    best = tune_training(cfg)
    assert len(best["trials"]) == 1 and best["trials"][0]["natural_defense_accuracy"] is not None
    validation_ids = set(read_images(cfg.validation).ids.tolist())
    trained_on = set(read_images(trial_training(cfg, best["params"], "x", sorted(validation_ids)).data).ids.tolist())
    assert trained_on and not trained_on & validation_ids
    tuned = build(TrainEBMConfig, yaml.safe_load(storage.read_bytes(best["file"])))  # what jobs/train_ebm.py reads
    assert tuned.langevin.steps == best["params"]["steps"] and tuned.iterations == cfg.train.iterations


def test_a_search_refuses_validation_images_it_would_evaluate_on(tmp_path):
    """Before any trial (and before Ray starts): one line naming the shared ids; disjoint ids run."""
    from distributed_ebm.distributed.tune import _validation_ids
    from distributed_ebm.errors import InputError
    cfg = build(TunePurificationConfig, {"attack": {"data": {"path": TEST_EXACT, "id_range": [0, 600]}},
                                         "validation": {"path": TEST_EXACT}, "rungs": [10], "output": str(tmp_path)})
    with pytest.raises(InputError, match=r"validation shares \d+ image ids with attack.data \(e.g. \[5"):
        tune_purification(cfg)
    assert not os.path.exists(tmp_path / "tune-purification")
    defaults = load_config(TunePurificationConfig, "jobs/configs/tune_purification.yaml", [])
    ids = _validation_ids(defaults, 200)
    assert len(ids) == 200 and min(ids) >= 500 and defaults.attack.data.id_range == [0, 500]


def test_a_stopped_search_resumes(ray_local, tmp_path):
    import glob
    import time

    from ray import tune
    ebm = str(tmp_path / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), ebm)
    tree = {"attack": {"classifier": {"weights": RESNET20}, "ebm": ebm, "purify": {"steps": 2},
                       "attack": {"steps": 1, "eot_attack": 2, "eot_defense": 2}, "batch_size": 4,
                       "ray": {"actors": 1}},
            "validation": {"random": 4}, "space": {"noise": {"low": 0.001, "high": 0.1}},
            "rungs": [2], "trials": 2, "max_concurrent": 1, "output": str(tmp_path / "search"), "name": "stop",
            "mlflow": {"enabled": False}}
    file = tmp_path / "search.yaml"
    file.write_text(yaml.safe_dump(tree))
    cfg = build(TunePurificationConfig, tree)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "jobs/tune_purification.py", "--config", str(file)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = str(tmp_path / "search" / "stop")
    deadline = time.time() + 240
    while time.time() < deadline and not (tune.Tuner.can_restore(path) and len(glob.glob(f"{path}/trials/*")) >= 2):
        time.sleep(0.5)
    job.kill()  # stop the search mid-way (a second trial has started, so the first has finished: one at a time)
    job.wait()
    first = os.path.basename(min(glob.glob(f"{path}/trials/*"), key=os.path.getctime))
    assert not storage.exists(storage.join(run_dir(cfg), TRIALS))
    best = tune_purification(cfg)
    finished = {t["trial"] for t in best["trials"]}
    # the search went on from its saved state: the finished trial is kept, the total is still 2
    # (a trial that was running at the kill may be replaced if the state was saved before it began)
    assert len(finished) == 2 and first in finished
