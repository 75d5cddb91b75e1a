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


def test_killed_actor_and_restarted_job_give_every_image_once(ray_local, tmp_path, ebm_url):
    kw = {"data.indices": list(range(12)), "batch_size": 2, "purify.steps": 40}
    reference = results.read_records(run_attack(_cfg(tmp_path, ebm_url, str(tmp_path / "ref"), **kw), OneProcess(),
                                                show=False)["config"]["output"])
    out = str(tmp_path / "crash")
    cfg = _cfg(tmp_path, ebm_url, out, **kw)
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("summary", run_attack(cfg, RayActors(), show=False)))
    worker.start()
    deadline = time.time() + 120
    while not results.list_parts(out) and time.time() < deadline:
        time.sleep(0.2)
    pids = _actor_pids()
    assert pids, "no attack actor process found"
    os.kill(pids[0], signal.SIGKILL)
    worker.join(timeout=300)
    assert "summary" in done and done["summary"]["images"] == 12
    _same(results.read_records(out), reference)

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


def test_a_pass_that_loses_an_actor_gives_back_the_other_actors_cpus_at_once(ray_local, tmp_path, ebm_url):
    """A pass that fails on a lost actor lets its other actors go before it raises, while its caller still holds
    the error. The frames the error reaches (Ray Data's scheduling thread, through `f_back`) hold the pass's
    tasks and, through their callbacks, its actors: uncleared, they keep a survivor and its CPU for as long as
    anyone holds the error. The test also keeps handles to the pass's actors, as something outside Python may: the
    CPU check then fails on any code that only drops references (the pass must stop them by id)."""
    import ray

    from distributed_ebm.distributed.attack import lost, run_pipeline
    from distributed_ebm.recipes.attack import images_without_records, preflight
    from distributed_ebm.store.data import catalog
    from distributed_ebm.store.provenance import attack_settings

    cfg = _cfg(tmp_path, ebm_url, str(tmp_path / "out"),
               **{"data.indices": list(range(12)), "batch_size": 2, "purify.steps": 40, "mlflow.enabled": False})
    settings = attack_settings(cfg)
    data = catalog(cfg.data)
    preflight(cfg, data)
    todo = images_without_records(data, cfg.output, settings)
    before = set(_actor_pids())  # none, unless an earlier test left one (the fixture then failed that test)
    killed, kept = [], []  # kept: the pass's actor handles, kept here as a holder outside the pass would
    killer = threading.Thread(target=_kill_an_actor_once_a_batch_is_written, args=(cfg.output, before, killed, kept))
    killer.start()
    with pytest.raises(Exception) as failed:  # held, with its traceback, as a caller that reports it would
        run_pipeline(ray, cfg, todo, settings, lambda images, broken: None, fitting=False)
    killer.join()
    assert lost(failed.value), (killed, before)
    held = [h for h in _actors_reached_from(failed.value) if "AttackActor" in repr(h)]
    assert not held, f"the error still holds the pass's actors: {held}"

    def returned():
        return ray.available_resources().get("CPU", 0) == 2 and not set(_actor_pids()) - before
    deadline = time.time() + 10
    while not returned() and time.time() < deadline:
        time.sleep(0.2)
    assert kept and returned(), (ray.available_resources().get("CPU", 0), _actor_pids(), killed)
    kept.clear()


def _actors_reached_from(root) -> list:
    """The Ray actor handles that `root` reaches, following every reference but those into modules, classes and
    the frames still running (any thread's: they hold what their callers hold, not what the error does)."""
    import gc
    import sys
    import types

    from ray.actor import ActorHandle

    running = set()
    for frame in sys._current_frames().values():
        while frame is not None:
            running.add(id(frame))
            frame = frame.f_back
    found, seen, todo = [], set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type)) or id(obj) in running:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict) and "__builtins__" in obj:  # a module's globals
            continue
        if isinstance(obj, ActorHandle):
            found.append(obj)
        todo += gc.get_referents(obj)
    return found


def _kill_an_actor_once_a_batch_is_written(out: str, before: set, killed: list, kept: list) -> None:
    import gc

    from ray.actor import ActorHandle

    deadline = time.time() + 120
    while not results.list_parts(out) and time.time() < deadline:
        time.sleep(0.2)
    kept.extend(o for o in gc.get_objects() if isinstance(o, ActorHandle) and "AttackActor" in repr(o))
    killed.append(min(set(_actor_pids()) - before))  # one of this pass's actors
    os.kill(killed[0], signal.SIGKILL)


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
