"""EBM training on Ray Train with bank actors, on a real local Ray (2 CPUs), S3 endpoint and MLflow store."""
import contextlib
import glob
import io
import os
import re
import signal
import threading
import time

import pytest
import torch
import yaml

from distributed_ebm.cli import main
from distributed_ebm.config import TrainEBMConfig, build
from distributed_ebm.distributed.train import run_dir, train_ebm_on_ray
from distributed_ebm.errors import InputError
from distributed_ebm.local.train import train_ebm
from distributed_ebm.method.training import TrainingDiverged, new_ebm
from distributed_ebm.store import storage
from distributed_ebm.store.data import subset
from distributed_ebm.store.released import load_ebm

from .conftest import TEST_EXACT, own_processes


@pytest.fixture(scope="module")
def small(exact_test):
    return subset(exact_test, count=64)


def _tree(tmp_path, name, **kw):
    # SGD throughout (sgd_lr in units of sigma^2/2: 0.01 moves the weights ~1e-3): updates linear in the
    # gradient, so runs that only differ in the order of float sums stay within 1e-6. Under Adam a
    # parameter whose gradient is ~0 (a bias behind saturated units) turns rounding noise into
    # full lr-sized steps; the Adam -> SGD switch is tested in the single-process tests.
    tree = {"ebm": {"width": 4}, "langevin": {"steps": 3}, "iterations": 6, "batch_size": 8, "bank_size": 32,
            "sgd_start": 0, "sgd_lr": 0.01, "checkpoint_every": 3, "log_every": 1, "output": str(tmp_path / "out"),
            "name": name,
            "ray": {"workers": 2, "bank_shards": 2, "max_failures": 3},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "art")}}
    for key, value in kw.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _close_to_single_process(tmp_path, tree, ebm_url, small):
    """Two DDP workers on halves of each batch = one process on the whole batch (up to float rounding)."""
    single = train_ebm(build(TrainEBMConfig, {**tree, "output": str(tmp_path / "single")}), data=small, show=False)
    ebm = load_ebm(ebm_url)
    x = small.floats()[:16]
    with torch.no_grad():
        assert torch.allclose(ebm(x), single.ebm(x), atol=1e-5)
    for (name, p), q in zip(ebm.named_parameters(), single.ebm.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    assert any(not torch.allclose(p, q) for p, q in zip(ebm.parameters(), new_ebm(single.cfg).parameters()))
    return single


@pytest.fixture(scope="module")
def resumed_on_s3(ray_local, tmp_path_factory, small, s3_bucket):
    """One run shared by the tests below: 2 workers, checkpoints to S3, MLflow; iterations 0 -> 3, then the job
    run again with the same name and output, 3 -> 6."""
    tmp_path = tmp_path_factory.mktemp("two")
    tree = _tree(tmp_path, "two", output=f"{s3_bucket}/train", **{"mlflow.artifact_location": f"{s3_bucket}/mlflow",
                                                                   "mlflow.experiment": "train-test",
                                                                   "data": {"path": TEST_EXACT, "count": 64}})
    # the first leg as a user runs it, `debm train-ebm --config FILE` (what it prints is checked below)
    file = tmp_path / "train.yaml"
    file.write_text(yaml.safe_dump({**tree, "iterations": 3}))
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(["train-ebm", "--config", str(file)])
    first = {"status": status, "out": out.getvalue(), "err": err.getvalue()}
    second = train_ebm_on_ray(build(TrainEBMConfig, tree), data=small)
    return tmp_path, tree, first, second


def test_two_workers_share_the_bank_checkpoint_to_s3_log_to_mlflow_and_resume(resumed_on_s3, small, s3_bucket):
    import mlflow
    tmp_path, tree, first, out = resumed_on_s3
    assert first["status"] == 0, first["err"][-2000:]
    assert f"EBM trained to iteration 3: {s3_bucket}/train/two/ebm.pt" in first["out"]
    # the driver's own progress line (rank 0 posts it; the workers print nothing here)
    assert ("two: 2 Ray Train worker(s) on CPU (the cluster has no GPU and no autoscaler that could add one)"
            in first["err"])
    progress = [line for line in first["err"].splitlines() if line.startswith("[train-ebm:two]")]
    assert progress and progress[-1].startswith("[train-ebm:two] 3/3 (100.0%)") and "energy_diff=" in progress[-1]
    assert "TrainingReport" not in first["out"] + first["err"]
    assert out["iteration"] == 6 and out["sgd"] == 1.0 and out["started_at"] == 3
    # the actors' own books (the second run's actors): every lease returned, none refused, none outstanding
    books = out["bank_books"]
    assert sum(b["leases"] for b in books) == sum(b["returns"] for b in books) == 3 * 8
    assert all(b["refused"] == 0 and b["leased_now"] == 0 and b["unheld_returns"] == 0 for b in books)
    # the checkpoint (in the bucket) holds the model, the optimizer and its phase, and the whole bank
    ckpt = out["checkpoint"]
    assert ckpt.startswith("debm-test/train/two/checkpoint_")
    state = storage.load_torch(f"s3://{ckpt}/ckpt.pt")  # the one training checkpoint, as every entry writes it
    tr = state["training"]
    assert state["iteration"] == 6 and tr["phase"] == "sgd" and "state" in tr["optimizer"]
    assert tr["history"]["iteration"] == [1, 2, 3, 4, 5, 6] and tr["fingerprint"]["data.images"] == 64
    banks = [storage.load_torch(f"s3://{ckpt}/bank-{k}.pt") for k in range(2)]
    assert [len(b["states"]) for b in banks] == [16, 16] and sum(int(b["steps"].sum()) for b in banks) == 6 * 8 * 3
    # the resumed run is the uninterrupted single-process run (up to the order of float sums)
    single = _close_to_single_process(tmp_path, _tree(tmp_path, "two"), out["ebm"], small)
    bank = torch.cat([b["states"] for b in banks])
    assert torch.allclose(bank, single.bank.states, atol=1e-4)
    assert not torch.allclose(bank, build_fresh_bank(single))  # the chains moved
    # MLflow: one run (continued on resume), the config as params, metrics over iterations, grids and the model in S3
    mlflow.set_tracking_uri(tree["mlflow"]["tracking_uri"])
    (run,) = mlflow.search_runs(experiment_names=["train-test"], output_format="list")
    assert run.data.params["ray.workers"] == "2" and run.data.params["langevin.steps"] == "3"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "energy_diff")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert ({"bank_age", "grad_norm", "iterations_per_second", "bank_share", "energy_pos", "energy_neg"}
            <= set(run.data.metrics))
    fs, _ = storage.filesystem(s3_bucket)
    fs.invalidate_cache()
    names = [os.path.basename(p) for p in fs.find(f"{s3_bucket.removeprefix('s3://')}/mlflow")]
    assert "bank-000000003.png" in names and "positives-000000006.png" in names and "MLmodel" in names


def build_fresh_bank(run):
    from distributed_ebm.method.bank import ImageBank
    return ImageBank(len(run.bank), run.bank.shape, "noise", run.cfg.seed).states


def _run_in_thread(cfg, small):
    box = {}

    def target():
        try:
            box["out"] = train_ebm_on_ray(cfg, data=small)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            box["error"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _checkpoints(cfg) -> list[int]:
    """The iterations of the checkpoints Ray Train has persisted so far (folders holding the state)."""
    return sorted(int(re.search(r"checkpoint_(\d+)", p).group(1))
                  for p in glob.glob(os.path.join(run_dir(cfg), "checkpoint_*", "ckpt.pt")))


def _wait_for(condition, what: str, timeout: float = 180):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)


def _final(out):
    """The final EBM's parameters and the whole bank of a finished run."""
    state = storage.load_torch(f"{out['checkpoint']}/ckpt.pt")
    bank = torch.cat([storage.load_torch(f"{out['checkpoint']}/bank-{k}.pt")["states"] for k in range(2)])
    return state["state_dict"], bank


def test_a_run_that_loses_a_bank_shard_then_a_worker_ends_bit_for_bit_as_the_uninterrupted_run(ray_local, tmp_path,
                                                                                                 small, capsys):
    """One run, two faults: a bank actor killed after the first checkpoint, then, once the restarted run has saved a
    checkpoint of its own, the Ray Train worker (one run instead of one per fault: a Ray Train run's start-up is most of
    its time here). One worker, so the uninterrupted run it must equal bit for bit is the single-process loop on one
    thread, as a Ray worker of 1 CPU computes (no second Ray Train run); two workers resume to rounding above."""
    import ray
    tree = _tree(tmp_path, "kill", iterations=60, checkpoint_every=10, log_every=5,
                 **{"langevin.steps": 20, "mlflow.enabled": False, "ray.workers": 1})
    cfg = build(TrainEBMConfig, tree)
    thread, box = _run_in_thread(cfg, small)
    _wait_for(lambda: _checkpoints(cfg), "checkpoint")
    time.sleep(0.5)  # let the report that registers it return
    ray.kill(ray.get_actor("debm-bank-kill-1"), no_restart=False)
    err = ""
    restart = r"train-ebm:kill: lost a worker or a bank shard; Ray Train restarted the run from its last checkpoint " \
              r"\((\d+) of 60 done; restart {}\)"

    def said(n):
        nonlocal err
        err += capsys.readouterr().err
        return re.search(restart.format(n), err)
    _wait_for(lambda: said(1), "restart after the bank shard's loss")
    resumed = int(said(1).group(1))
    assert resumed in (10, 20, 30, 40), err
    _wait_for(lambda: _checkpoints(cfg)[-1] > resumed, "checkpoint of the restarted run")
    time.sleep(0.5)
    workers = own_processes(b"ray::RayTrainWorker")
    assert workers, "no Ray Train worker process found"
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    out = box["out"]
    assert out["iteration"] == 60 and out["started_at"] > resumed  # restarted again, from a later checkpoint
    assert said(2), err  # the console says so in a line of the project's own (not only in Ray's raw lines)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the float sums of a 1-CPU Ray worker
    try:
        straight = train_ebm(build(TrainEBMConfig, {**tree, "output": str(tmp_path / "straight")}), data=small,
                             show=False)
    finally:
        torch.set_num_threads(threads)
    ebm, bank = _final(out)
    assert torch.equal(bank, straight.bank.states)
    assert all(torch.equal(ebm[k], p) for k, p in straight.ebm.state_dict().items())
    # ebm.pt is the newest checkpoint's model; no folder beyond the registered checkpoints
    assert all(torch.equal(p, ebm[k]) for k, p in load_ebm(out["ebm"]).state_dict().items())
    folders = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir(cfg), "checkpoint_0*")))
    assert folders == ["checkpoint_000000050", "checkpoint_000000060"]


def test_resume_with_other_settings_fails_before_any_work_naming_them(resumed_on_s3, small):
    from distributed_ebm.errors import InputError
    _, tree, _, out = resumed_on_s3
    with pytest.raises(InputError, match=r"two was trained with langevin.step_size=1.0, seed=0; this run has "
                                         r"langevin.step_size=0.5, seed=1 \(settings that change results must match"):
        train_ebm_on_ray(build(TrainEBMConfig, {**tree, "seed": 1, "iterations": 9,
                                                "langevin": {"steps": 3, "step_size": 0.5}}), data=small)
    with pytest.raises(InputError, match=r"data.images=64.*this run has data.images=32"):  # other images: refused too
        train_ebm_on_ray(build(TrainEBMConfig, {**tree, "iterations": 9, "bank_size": 32}), data=small.take(range(32)))
    assert storage.load_torch(out["ebm"])["iteration"] == 6


def test_non_finite_loss_stops_with_a_clear_message(ray_local, tmp_path, small):
    # an absurd SGD step makes the energies blow up within a few iterations
    # one worker and one bank shard: stopping on a non-finite loss needs no second process of either kind
    cfg = build(TrainEBMConfig, _tree(tmp_path, "nan", iterations=40, checkpoint_every=1, sgd_lr=1e6,
                                      **{"mlflow.enabled": False, "ray.workers": 1, "ray.bank_shards": 1}))
    with pytest.raises(TrainingDiverged,
                       match=r"EBM loss is (nan|inf|-inf), .* at iteration (\d+); the last good checkpoint") as err:
        train_ebm_on_ray(cfg, data=small)
    failed_at = int(re.search(r"at iteration (\d+);", str(err.value)).group(1))
    saved = storage.load_torch(storage.join(run_dir(cfg), "ebm.pt"))
    assert saved["iteration"] == failed_at - 1 and 1 < failed_at < 40
    assert all(torch.isfinite(p).all() for p in load_ebm(storage.join(run_dir(cfg), "ebm.pt")).parameters())


def test_classifier_trains_on_ray_and_resumes(ray_local, tmp_path):
    import mlflow

    from distributed_ebm.config import TrainClassifierConfig
    from distributed_ebm.distributed.train_classifier import train_classifier_on_ray
    from distributed_ebm.store.checkpoints import CLASSIFIER_CKPT, load_classifier

    def cfg(epochs):
        return build(TrainClassifierConfig, {
            "data": {"path": TEST_EXACT, "count": 100},
            "test_data": {"path": TEST_EXACT, "indices": list(range(900, 950))},
            "classifier": {"arch": "wrn", "wrn_depth": 10, "wrn_widen": 1, "weights": None},
            "epochs": epochs, "batch_size": 50, "lr_milestones": [1], "output": str(tmp_path / "clf"), "name": "wrn",
            "ray": {"workers": 2}, "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                               "artifact_location": str(tmp_path / "art"), "experiment": "clf"}})
    first = train_classifier_on_ray(cfg(1))
    assert first["epoch"] == 1
    second = train_classifier_on_ray(cfg(2))
    assert second["epoch"] == 2 and 0 <= second["test_accuracy"] <= 1
    state = storage.load_torch(f"{second['checkpoint']}/{CLASSIFIER_CKPT}")
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert state["scheduler"]["last_epoch"] == 2 and state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    clf = load_classifier("wrn", second["classifier"])
    assert clf(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["clf"], output_format="list")  # one run, continued
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "test_accuracy")]
    assert steps == [1, 2]


def test_too_few_resources_fail_within_the_startup_timeout_saying_why(ray_local, tmp_path, small):
    # 2 one-CPU workers on a 2-CPU cluster one of whose CPUs an actor holds: what a run that lost a node meets when
    # Ray Train restarts it (the cluster could hold them, its free CPUs cannot)
    holder = ray_local.remote(num_cpus=1)(type("Holder", (), {"ping": lambda self: 1})).remote()
    ray_local.get(holder.ping.remote())
    cfg = build(TrainEBMConfig, _tree(tmp_path, "cap", **{"ray.startup_timeout_s": 3, "mlflow.enabled": False}))
    try:
        t0 = time.time()
        thread, box = _run_in_thread(cfg, small)
        thread.join(timeout=90)  # Ray Train's default: retry the start-up forever
    finally:
        ray_local.kill(holder)
    assert not thread.is_alive(), "still waiting for resources after 90 s"
    assert time.time() - t0 < 60
    assert re.match(r"2 workers \(1 CPU each, ray.workers\) could not be placed within ray.startup_timeout_s=3 s "
                    r"\(a lost node, or too few free resources\); the last checkpoint is in ",
                    str(box.get("error"))), box


def test_more_workers_than_the_cluster_can_hold_are_refused_at_once(ray_local, tmp_path, small):
    cfg = build(TrainEBMConfig, _tree(tmp_path, "big", **{"ray.workers": 4, "mlflow.enabled": False}))
    t0 = time.time()
    with pytest.raises(InputError) as err:
        train_ebm_on_ray(cfg, data=small)
    assert time.time() - t0 < 20
    assert str(err.value) == ("ray.workers = 4: this cluster can hold at most 2 of them (1 CPU each, its alive "
                              "nodes, and it has no autoscaler)")
