"""The Ray Data evaluation engine on a real local Ray (2 CPUs), a real S3 endpoint and MLflow store."""
import os
import signal
import threading
import time

import numpy as np
import pytest

from distributed_ebm.config import AttackConfig, build
from distributed_ebm.distributed.attack import RayActors
from distributed_ebm.errors import InputError
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.method.nets import EBM
from distributed_ebm.recipes.attack import run_attack
from distributed_ebm.results import records as results
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import save_ebm

from .conftest import RESNET20, TEST_EXACT, own_processes, tiny_ebm


@pytest.fixture(scope="module")
def ebm_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ebm") / "ebm.pt")
    save_ebm(tiny_ebm(scale=20), url)
    return url


def _cfg(tmp_path, ebm_url, out, **kw):
    tree = {"data": {"path": TEST_EXACT, "indices": list(range(8))},
            "classifier": {"arch": "resnet20", "weights": RESNET20}, "ebm": ebm_url,
            "purify": {"steps": 2, "noise": 0.05},
            "attack": {"mode": "bpda_eot", "eps": "1/255", "step_size": "0.5/255", "steps": 2,
                       "eot_attack": 2, "eot_defense": 3},
            "batch_size": 3, "precision": "float64", "seed": 3, "output": out,
            "ray": {"actors": 2}, "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                              "artifact_location": str(tmp_path / "artifacts")}}
    for key, value in kw.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build(AttackConfig, tree)


def _same(a, b):
    cols = ["index", "label", "natural_protocol_pred", "natural_protocol_correct", "natural_defense_pred",
            "natural_defense_correct", "broken_at", "final_pred", "image_steps", "confirm_image_steps", "adv_loss",
            "reeval_correct"]
    for c in cols:
        assert a.column(c).to_pylist() == b.column(c).to_pylist(), c
    assert np.allclose(np.array(a.column("adv_image").to_pylist()), np.array(b.column("adv_image").to_pylist()),
                       atol=1e-9)


STRONGER = {"attack.mode": "exact_eot", "attack.optimizer": "apgd", "attack.loss": "dlr", "attack.segment": 1,
            "attack.reevaluations": 2}


@pytest.mark.parametrize("settings", [{}, STRONGER], ids=["bpda_eot", "exact_apgd_dlr_reeval"])
def test_pipeline_equals_the_single_process_attack(ray_local, tmp_path, ebm_url, settings):
    single = run_attack(_cfg(tmp_path, ebm_url, str(tmp_path / "single"), **settings), OneProcess(), show=False)
    readers = _footer_readers()
    piped = run_attack(_cfg(tmp_path, ebm_url, str(tmp_path / "ray"), **settings), RayActors(), show=False)
    # the one parquet file's footer is read by one actor (Ray Data's default started 32 processes per pass)
    assert _footer_readers() - readers == 1
    _same(results.read_records(str(tmp_path / "single")), results.read_records(str(tmp_path / "ray")))
    broken_at = results.read_records(str(tmp_path / "ray")).column("broken_at").to_pylist()
    assert {r for r in broken_at} - {-1}, "some breaks"
    keys = ["natural_protocol_accuracy", "natural_defense_accuracy", "robust_accuracy", "accuracy_curve", "image_steps",
            "convergence"]  # the vote and steps figures too: the same records give the same convergence
    if settings:
        keys += ["reeval_accuracies", "reeval_mean_accuracy", "reeval_all_right_accuracy",
                 "worst_of_all_judgements_accuracy"]
        assert piped["reevaluations"] == 2
    for k in keys:
        assert piped[k] == single[k]
    assert len(results.list_parts(str(tmp_path / "ray"))) >= 3  # several batches, several actors' files


def _footer_readers() -> int:
    """How many footer-reading actors the session's Ray has started so far (the dead ones included)."""
    from ray._private import state
    return sum(a.get("ActorClassName") == "FooterReader" for a in state.actors().values())


def _actor_pids():
    return own_processes(b"AttackActor")


def test_a_killed_actor_is_restarted_and_runs_only_the_batch_it_held_again(ray_local, tmp_path, ebm_url, capfd):
    """Before: a lost actor failed the whole pass, every actor's batch in flight was thrown away and the pass ran
    again. Now the pass goes on: the actor is restarted and runs again the one batch it held."""
    kw = {"data.indices": list(range(12)), "batch_size": 2, "purify.steps": 40}
    reference = results.read_records(run_attack(_cfg(tmp_path, ebm_url, str(tmp_path / "ref"), **kw), OneProcess(),
                                                show=False)["config"]["output"])
    out = str(tmp_path / "crash")
    cfg = _cfg(tmp_path, ebm_url, out, **kw)
    done, executor = {}, RayActors()
    worker = threading.Thread(target=lambda: done.setdefault("summary", run_attack(cfg, executor, show=False)))
    worker.start()
    _kill_an_actor_once_a_batch_is_written(out)
    worker.join(timeout=300)
    err = capfd.readouterr().err
    assert "summary" in done and done["summary"]["images"] == 12, err[-2000:]
    _same(results.read_records(out), reference)
    assert executor.losses.redone == 1 and len(executor.losses.events) == 1, err[-2000:]
    assert "an actor was lost on node" in err and "it ran the batch it held again (2 images)" in err, err[-2000:]
    assert "6 batch(es) on 1 node(s) by 2 actor(s); 1 run again after a lost actor" in err, err[-2000:]
    assert "running again on the images without a record" not in err  # the pass itself went on

    # stop-and-start: drop two finished batches, rerun: only those images are computed again
    parts = results.list_parts(out)
    lost = [i for url in parts[:2] for i in results._read(url, ["index"]).column("index").to_pylist()]
    for url in parts[:2]:
        storage.filesystem(url)[0].rm(url)
    again = run_attack(cfg, RayActors(), show=False)
    per_image = dict(zip(reference.column("index").to_pylist(), reference.column("image_steps").to_pylist()))
    assert again["image_steps_this_run"] == sum(per_image[i] for i in lost)
    _same(results.read_records(out), reference)


def test_bad_input_fails_before_any_actor(tmp_path, ebm_url):
    # no ray fixture: each failure must come from the pre-flight checks, before Ray is touched
    with pytest.raises(FileNotFoundError, match="nope.th does not exist"):
        run_attack(_cfg(tmp_path, ebm_url, str(tmp_path / "o"), **{"classifier.weights": str(tmp_path / "nope.th")}),
                   RayActors())
    big = str(tmp_path / "ebm64.pt")
    save_ebm(EBM(width=2, image_size=64), big)
    with pytest.raises(InputError, match="is for 64x64 images, the data are 32x32"):
        run_attack(_cfg(tmp_path, big, str(tmp_path / "o")), RayActors())
    with pytest.raises(InputError, match="ids \\[5000\\] are not in the data"):
        run_attack(_cfg(tmp_path, ebm_url, str(tmp_path / "o"), **{"data.indices": [5000]}), RayActors())
    with pytest.raises(InputError, match="attack.eps = 2.0: Input should be less than or equal to 1"):
        _cfg(tmp_path, ebm_url, str(tmp_path / "o"), **{"attack.eps": 2.0})
    with pytest.raises(InputError, match="indices is empty"):
        _cfg(tmp_path, ebm_url, str(tmp_path / "o"), **{"data.indices": []})
    assert not storage.exists(str(tmp_path / "o"))


def test_losses_past_max_failures_stop_the_job_in_one_line_and_keep_the_records(ray_local, tmp_path, ebm_url):
    from distributed_ebm.errors import JobFailed

    # batches enough that a restarted actor, which reports its restart with its next batch, still gets one
    kw = {"data.indices": list(range(24)), "batch_size": 2, "purify.steps": 40, "mlflow.enabled": False}
    cfg = _cfg(tmp_path, ebm_url, str(tmp_path / "out"), **{**kw, "ray.max_failures": 0})
    failed = {}

    def attack():
        try:
            run_attack(cfg, RayActors(), show=False)
        except JobFailed as err:
            failed["error"] = err
    worker = threading.Thread(target=attack)
    worker.start()
    killed = _kill_an_actor_once_a_batch_is_written(cfg.output)
    worker.join(timeout=300)
    assert "error" in failed, killed
    assert "1 loss(es) in the last hour (ray.max_failures = 0 per hour): too many, stopping" in str(failed["error"])
    kept = results.done_ids(cfg.output)
    assert kept  # the loss is known once the restarted actor has run its batch again: late in so short a pass
    records = results.read_records(cfg.output, ["index", "image_steps"])
    steps = dict(zip(records.column("index").to_pylist(), records.column("image_steps").to_pylist()))
    again = run_attack(_cfg(tmp_path, ebm_url, cfg.output, **kw), RayActors(), show=False)  # the same command
    assert again["images"] == 24 and again["image_steps"] - again["image_steps_this_run"] == sum(steps.values())


def _kill_an_actor_once_a_batch_is_written(out: str) -> int:
    """SIGKILL the attack actor that has worked most (it wrote a batch and holds the next one), once a batch is
    written and every actor has been running for a while: an actor killed in its constructor is replaced, not
    restarted."""
    deadline = time.time() + 120
    while not results.list_parts(out) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)

    def cpu_seconds(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    pid = max(_actor_pids(), key=cpu_seconds)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_frame_another_thread_still_runs_is_released_once_that_thread_leaves_it():
    """A race that could keep a failed pass's actors alive: the error passes through a frame of another thread (Ray
    Data's) that is still running when `release_frames` sweeps, so that frame, and what its locals reach, would
    stay held by the error. The sweep is repeated once the thread has left the frame."""
    import weakref

    from distributed_ebm.distributed.attack import release_frames

    class Payload:  # stands for the pass's actors
        pass
    box, leave = {}, threading.Event()

    def scheduler():  # Ray Data's thread: the error goes up through this frame, which then goes on a while
        payload = Payload()
        box["payload"] = weakref.ref(payload)
        try:
            raise RuntimeError("actor died")
        except RuntimeError as err:
            box["err"] = err
        leave.wait(5)
    thread = threading.Thread(target=scheduler)
    thread.start()
    while "err" not in box:
        time.sleep(0.01)
    threading.Timer(0.3, leave.set).start()
    err = box["err"]  # held, as a caller that reports it would
    release_frames(err)
    thread.join()
    assert box["payload"]() is None, "the error still holds the frame's locals"
    assert str(err) == "actor died" and err.__traceback__ is not None  # the error itself is untouched


def test_what_the_cleared_frames_held_in_a_cycle_is_freed_at_once():
    """What a failed pass's frames held in reference cycles (Ray Data's operators and their actors) becomes garbage
    when the frames are cleared, but only a full collection frees it, which a caller waiting on a retry or a
    report may not trigger for a long time, its actors keeping their CPUs meanwhile. Fails without release_frames'
    own collection."""
    import gc
    import weakref

    from distributed_ebm.distributed.attack import release_frames

    class Node:  # stands for the pass's operators, which refer to each other, and its actors
        pass

    def failing_pass():
        a, b = Node(), Node()
        a.other, b.other = b, a
        refs.append(weakref.ref(a))
        raise RuntimeError("actor died")
    refs = []
    enabled = gc.isenabled()
    gc.disable()  # the collector's own schedule must not decide it: none here
    try:
        try:
            failing_pass()
        except RuntimeError as err:
            held = err
        release_frames(held)
        assert refs[0]() is None, "the cycle the cleared frame held is still alive"
    finally:
        if enabled:
            gc.enable()
