"""Faults without silent damage: where Ray connects, and how the jobs fail when they cannot go on."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import REPO


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def test_an_unreachable_address_fails_within_seconds_naming_it(tmp_path):
    t0 = time.time()
    done = subprocess.run([sys.executable, "jobs/attack.py", "--config", "jobs/configs/attack_pgd_undefended.yaml",
                           "data.count=2", "ray.address=127.0.0.1:1", f"output={tmp_path}/out", "mlflow.enabled=false"],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=REPO)
    assert time.time() - t0 < 60
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("debm attack: ray.address=127.0.0.1:1: no Ray cluster answers there"), line


def test_without_an_address_ray_starts_its_own_instead_of_joining_a_recorded_cluster():
    # what an earlier `ray start` leaves behind, pointing at nothing: ray.init() alone would try to join it
    # (a short temp dir: Ray's socket paths must stay under 107 bytes)
    temp = Path(tempfile.mkdtemp(prefix="debm"))
    (temp / "ray").mkdir(parents=True)
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    script = ("import ray; from distributed_ebm.distributed.cluster import connect;"
              "connect(None); print('cpus', ray.cluster_resources().get('CPU')); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                          env=_env(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0"), cwd=REPO)
    shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0 and "cpus " in done.stdout, done.stderr[-2000:]


def test_an_attack_rerun_with_other_settings_fails_before_any_work_naming_them(tmp_path):
    from distributed_ebm.config import AttackConfig, load_config
    from distributed_ebm.errors import InputError
    from distributed_ebm.local.attack import OneProcess
    from distributed_ebm.recipes.attack import run_attack
    from distributed_ebm.results.records import read_records

    def cfg(*extra):
        return load_config(AttackConfig, "jobs/configs/attack_pgd_undefended.yaml",
                           ["data.count=2", "attack.steps=2", f"output={tmp_path}/out", "mlflow.enabled=false", *extra])
    first = run_attack(cfg(), OneProcess(), show=False)
    # settings that cannot change a record may differ: more images, another batch size
    more = run_attack(cfg("data.count=3", "batch_size=1", "chunk_size=7"), OneProcess(), show=False)
    assert more["images"] == 3
    assert more["seconds"] == first["seconds"] + more["seconds_this_run"]  # the summary counts every run's time
    again = run_attack(cfg("data.count=3"), OneProcess(), show=False)  # nothing left to compute: its time not counted
    assert again["seconds"] == more["seconds"] and again["seconds_this_run"] > 0
    with pytest.raises(InputError) as err:
        run_attack(cfg("data.count=4", "attack.steps=3", "attack.eps=0.01"), OneProcess(), show=False)
    assert str(err.value).startswith(f"{tmp_path}/out/records was written with other settings: "
                                     "attack.eps (0.03137254901960784 there, 0.01 now), attack.steps (2 there, 3 now);")
    assert read_records(f"{tmp_path}/out").num_rows == 3  # nothing was attacked


@pytest.fixture(scope="module")
def two_node(tmp_path_factory) -> dict:
    """tests/two_node.py's JSON line: an attack and then a training run, each losing a node of one two-node
    cluster, run in a process of its own."""
    import json
    out = tmp_path_factory.mktemp("two-node")
    temp = Path(tempfile.mkdtemp(prefix="debm"))  # Ray's socket paths must stay short
    try:
        done = subprocess.run([sys.executable, "tests/two_node.py", str(out / "out")],
                              capture_output=True, text=True, timeout=600, cwd=REPO,
                              env=_env(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                                       RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1"))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stderr[-3000:]
    return {**json.loads(lines[-1]), "out": out / "out"}


@pytest.mark.slow
def test_training_that_loses_a_node_fails_within_the_startup_timeout_saying_why(two_node):
    got = two_node["training"]
    assert got["finished"], "still waiting for the lost node's resources"
    assert got["seconds_after_kill"] < 120
    assert got["error"].startswith("CapacityLost: 2 workers (1 CPU each, ray.workers) could not be placed within "
                                   "ray.startup_timeout_s=5 s (a lost node, or too few free resources); the last "
                                   "checkpoint is in "), got["error"]


@pytest.mark.slow
def test_an_attack_that_loses_a_node_finishes_with_every_image_once_as_the_reference(two_node):
    got = two_node["attack"]
    # one storage: a local output on two nodes is refused before any work unless ray.shared_filesystem vouches for it
    assert got["refused"] == (f"output {two_node['out']}/refused is a local path but the cluster has 2 nodes, each of "
                              "which would write to its own disk: use an object store (s3://...), or set "
                              "ray.shared_filesystem=true if every node mounts this path"), got["refused"]
    assert got["finished"], "the attack never finished after the node was lost"
    assert got["error"] is None, got["error"]
    assert got["done_before_kill"] < 12, "the node was lost only after the attack"
    assert got["images"] == 12 and got["ids"] == list(range(12))  # every image, once
    assert got["differ"] == [], f"records differ from the uninterrupted run in {got['differ']}"


def _pgd(tmp_path, *extra):
    from distributed_ebm.config import AttackConfig, load_config

    return load_config(AttackConfig, "jobs/configs/attack_pgd_undefended.yaml",
                       ["data.count=3", "attack.steps=1", "batch_size=1", f"output={tmp_path}/out",
                        "mlflow.enabled=false", "report.gallery=0", *extra])


def test_a_record_part_cut_short_is_named_set_aside_and_its_images_attacked_again(tmp_path, capsys):
    """A part cut short by a copy or a full disk (not by our atomic writes) stopped every resume with pyarrow's
    "Parquet magic bytes not found" traceback; now one line names it and its images are attacked again."""
    from distributed_ebm.local.attack import OneProcess
    from distributed_ebm.recipes.attack import run_attack
    from distributed_ebm.results.records import list_parts, read_records

    first = run_attack(_pgd(tmp_path), OneProcess("cpu"), show=False)
    before = read_records(str(tmp_path / "out")).to_pylist()
    cut = list_parts(str(tmp_path / "out"))[1]
    with open(cut, "r+b") as f:
        f.truncate(100)
    again = run_attack(_pgd(tmp_path), OneProcess("cpu"), show=False)
    err = capsys.readouterr().err
    assert f"records: {cut} cannot be read (" in err and f"set aside as {cut}.damaged" in err
    assert os.path.exists(cut + ".damaged") and again["images"] == first["images"] == 3
    assert again["robust_accuracy"] == first["robust_accuracy"]
    after = read_records(str(tmp_path / "out")).to_pylist()
    assert [r["index"] for r in after] == [r["index"] for r in before]
    assert [r["adv_image"] for r in after] == [r["adv_image"] for r in before]  # recomputed: the same records


def test_ctrl_c_says_how_many_images_are_recorded_and_the_rerun_continues(tmp_path):
    """Ctrl-C during an attack printed a bare KeyboardInterrupt traceback; now one line, exit 130, and the same
    command continues exactly."""
    from distributed_ebm.errors import run_job
    from distributed_ebm.local.attack import OneProcess
    from distributed_ebm.recipes.attack import run_attack

    class CtrlCAfterOneBatch(OneProcess):
        def run(self, cfg, todo, settings, attack, gradient_ids, on_batch, reruns):
            def batch_then_interrupt(images, broken):
                on_batch(images, broken)
                raise KeyboardInterrupt

            super().run(cfg, todo, settings, attack, gradient_ids, batch_then_interrupt, reruns)

    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = run_job("debm attack", lambda: run_attack(_pgd(tmp_path), CtrlCAfterOneBatch("cpu"), show=False))
    assert code == 130
    assert err.getvalue().strip().splitlines()[-1] == (
        f"debm attack: interrupted: 1 of 3 images are recorded under {tmp_path}/out; the same command continues "
        "with the others")
    resumed = run_attack(_pgd(tmp_path), OneProcess("cpu"), show=False)
    straight = run_attack(_pgd(tmp_path / "b"), OneProcess("cpu"), show=False)
    assert resumed["images"] == straight["images"] == 3 and resumed["robust_accuracy"] == straight["robust_accuracy"]
