"""A cluster that grows, rehearsed on this machine: Ray's fake multinode provider runs a real autoscaler that adds
worker nodes carrying logical GPUs (`{CPU: 1, GPU: 1}`, none at start) to a head of 1 CPU, as a KubeRay head or a
launcher cluster scales up GPU pods or instances from zero. Its head has no `~/ray_bootstrap_config.yaml`, as
KubeRay's has none: the jobs find the autoscaler through the GCS, and learn its node types only where
DEBM_AUTOSCALER_CONFIG names the file (as the launcher's does). One cluster for the module, started with
`ray start` in a folder of its own and stopped by pid (never `ray stop`, which stops every Ray of the machine).
The jobs run through the command line's entry (`debm`, which jobs/*.py call) against the cluster's address, all in
one driver process (its imports and connection are most of a job's time here)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from .conftest import REPO

# on the worker of the session's Ray, one test after the other: beside them on 2 CPUs, both slow down more than the
# suite gains (benchmarks/README.md)
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray_local")]

GPU_NODES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(port: int) -> dict:
    empty = {k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                             "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                             "cluster_synced_files")}
    return {"cluster_name": "rehearsal", "max_workers": GPU_NODES, "idle_timeout_minutes": 5, "upscaling_speed": 1.0,
            "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"}, "head_node_type": "head",
            "available_node_types": {
                "head": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                        "max_workers": GPU_NODES}},
            "file_mounts": {}, "file_mounts_sync_continuously": False, **empty}


def _ours(folder: str) -> list[int]:
    """The processes of this cluster: the head's and those of the nodes its autoscaler started (not children of
    this process), recognized by their working directory or command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if cwd == folder or cwd.startswith(folder + "/") or folder.encode() in cmdline:
            pids.append(int(entry))
    return pids


def _stop(folder: str) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _ours(folder)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}") and _alive(p)]
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    folder = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths stay under 107 bytes
    port = _free_port()
    config = os.path.join(folder, "autoscaler.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(_config(port), f)
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1"}
    try:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
                        "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
                        f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
                        f"--dashboard-agent-listen-port={_free_port()}", f"--autoscaling-config={config}",
                        f"--temp-dir={folder}/ray"], cwd=folder, env=env, check=True, capture_output=True,
                       timeout=120)
        # the jobs see an autoscaler once its monitor has reported to the GCS (seconds after the head starts; more
        # on a busy machine): until then a cluster that can grow looks fixed
        subprocess.run([sys.executable, "-c", AUTOSCALER_REPORTED, f"127.0.0.1:{port}"], cwd=REPO, check=True,
                       capture_output=True, timeout=150, env={**os.environ, "PYTHONPATH": str(REPO)})
        yield {"address": f"127.0.0.1:{port}", "config": config, "folder": folder}
    finally:
        _stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


AUTOSCALER_REPORTED = """
import sys, time
import ray
from distributed_ebm.distributed.ray_private import autoscaler_runs
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 120
while not autoscaler_runs():
    if time.monotonic() > deadline:
        sys.exit("the rehearsal's autoscaler never reported to the GCS")
    time.sleep(1)
"""
DRIVER = """
import json, os, sys, threading, time
from distributed_ebm.cli import main
from tests.test_rehearsal import kill_a_node_once_a_batch_is_written
for name, env, args, kill in json.loads(sys.argv[1]):
    for k, v in env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    print(f"=== {name}", file=sys.stderr, flush=True)
    if kill:
        threading.Thread(target=kill_a_node_once_a_batch_is_written, args=(kill,), daemon=True).start()
    t0 = time.monotonic()
    rc = main(args)
    print(f"=== {name} {rc} {time.monotonic() - t0:.1f}", file=sys.stderr, flush=True)
"""
# every wait for nodes bounded well inside the driver's time limit
PGD = ["attack", "--config", "jobs/configs/attack_pgd_undefended.yaml", "data.count=2", "batch_size=2",
       "attack.steps=1", "mlflow.enabled=false", "ray.provision_timeout_s=240"]
# 6 batches of a few seconds each (a budget too small to break an image: every step runs), for a node to come
LONGER = ["data.count=12", "attack.steps=200", "attack.eps=1e-4", "attack.step_size=1e-5"]
TRAIN = ["train-ebm", "--config", "jobs/configs/train_ebm_cpu.yaml", "data.count=64", "batch_size=48", "iterations=2",
         "ray.provision_timeout_s=240"]


@pytest.fixture(scope="module")
def rehearsed(cluster, s3_bucket, tmp_path_factory):
    """Every job of this module, in order, in one driver: {name: (exit status, seconds, its output)}."""
    out = tmp_path_factory.mktemp("rehearsal")
    known = {"DEBM_AUTOSCALER_CONFIG": cluster["config"]}  # as on the launcher's head
    unknown = {"DEBM_AUTOSCALER_CONFIG": None}  # as on KubeRay's
    address = f"ray.address={cluster['address']}"
    shared = "ray.shared_filesystem=true"  # the fake nodes share this machine's disk
    jobs = [
        ("cpus_per_actor", known, [*PGD, address, shared, "ray.cpus_per_actor=64", f"output={out}/a"]),
        ("workers", known, [*TRAIN, address, shared, "ray.workers=3", "ray.use_gpu=true", "mlflow.enabled=false",
                            f"output={out}/t"]),
        ("local_output", unknown, [*PGD, address, f"output={out}/local"]),
        ("sqlite", unknown, [*TRAIN, address, f"output={s3_bucket}/rehearsal",
                             f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db"]),
        ("bounded", unknown, [*PGD, address, shared, "ray.gpus_per_actor=4", "ray.provision_timeout_s=3",
                              f"output={out}/b"]),
        ("gpu_attack", unknown, [*PGD, *LONGER, address, shared, "ray.gpus_per_actor=1", f"output={out}/g"]),
        ("gpu_training", {**unknown, "DEBM_REHEARSAL_CPU": "1"},
         [*TRAIN, address, shared, "ray.workers=2", "ray.use_gpu=true", "batch_size=8", "bank_size=32",
          "ebm.width=4", "langevin.steps=2", "checkpoint_every=1", "log_every=1", "mlflow.enabled=false",
          f"output={out}/gt"]),
        ("lose_node", unknown, [*PGD, *LONGER, address, shared, "ray.gpus_per_actor=1", f"output={out}/n"],
         f"{out}/n"),
    ]
    jobs = [job if len(job) == 4 else (*job, None) for job in jobs]
    try:
        stderr = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], cwd=REPO, capture_output=True,
                                text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}).stderr
    except subprocess.TimeoutExpired as err:  # the jobs that ended keep their results; the one running fails
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    got, name, lines = {}, None, []
    for line in stderr.splitlines():
        if line.startswith("=== "):
            parts = line.split()
            if len(parts) == 2:
                name, lines = parts[1], []
            else:
                got[name] = (int(parts[2]), float(parts[3]), "\n".join(lines))
        elif name:
            lines.append(line)
    if name is not None and name not in got:  # cut off by the driver's time limit
        got[name] = (None, None, "\n".join(lines))
    return {**got, "out": out, "uri": f"sqlite:///{out}/mlflow.db"}


def kill_a_node_once_a_batch_is_written(output: str) -> None:
    """As a spot node's loss: SIGKILL the raylet of the node an attack actor runs on and every process under it,
    once the pass has written a batch and its actors hold the next ones (the actor that has worked most)."""
    records = os.path.join(output, "records")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (os.path.isdir(records) and any(
            f.startswith("part-") for f in os.listdir(records))):
        time.sleep(0.2)
    time.sleep(1.0)
    parent, cmdline, cpu = {}, {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline[int(entry)] = f.read()
            parent[int(entry)], cpu[int(entry)] = int(fields[1]), int(fields[11]) + int(fields[12])
        except OSError:
            pass
    actor = max((p for p, c in cmdline.items() if b"AttackActor" in c), key=cpu.get)
    raylet = actor
    while raylet in parent and b"raylet/raylet" not in cmdline.get(raylet, b""):
        raylet = parent[raylet]
    with open(f"/proc/{raylet}/environ", "rb") as f:
        node = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)[b"RAY_OVERRIDE_NODE_ID_FOR_TESTING"]
    tree, grew = {raylet}, True
    while grew:
        grew = {p for p, up in parent.items() if up in tree} - tree
        tree |= grew
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"rehearsal: killed node {node.decode()} ({len(tree)} processes)", file=sys.stderr, flush=True)


def last_line(got) -> str:
    return got[2].strip().splitlines()[-1]


def test_a_job_naming_its_gpus_on_a_head_without_the_launchers_file_waits_for_its_node(rehearsed):
    """Before: "no autoscaler that could add one", the RayJob of cluster/kuberay/ refused at once."""
    rc, _, err = rehearsed["gpu_attack"]
    assert rc == 0, err[-3000:]
    assert "attack: waiting up to ray.provision_timeout_s = 240 s for the autoscaler to add nodes for 1 x (1 CPU, " \
           "1 GPU)" in err, err[-3000:]
    assert "attack: the nodes are there" in err
    assert (rehearsed["out"] / "g" / "summary.json").exists()


def test_an_attack_starts_on_the_first_gpu_node_and_grows_onto_the_next(rehearsed):
    """Before: the pool was sized from the nodes alive at submit (one actor on a cold cluster, forever)."""
    rc, _, err = rehearsed["gpu_attack"]
    assert rc == 0, err[-3000:]
    assert re.search(r"attack:pgd: [12] actor\(s\) on GPU \(1 GPU each, on nodes asked of the autoscaler, which does "
                     r"not say what it can add\), growing to 6 as the cluster holds them", err), err[-3000:]
    ran = re.search(r"attack:pgd: 6 batch\(es\) on (\d+) node\(s\) by (\d+) actor\(s\); 0 run again", err)
    assert ran and int(ran[1]) >= 2 and int(ran[2]) >= 2, err[-3000:]


def test_a_node_lost_mid_pass_costs_only_the_batches_its_actors_held(rehearsed):
    """Before: a lost actor failed the pass, every actor's batch in flight was thrown away and the pass ran again
    (`ray.max_failures` times a job). Now the node's actor (one: a node holds one GPU) is restarted on another node
    and runs again the one batch it held; the other batches ran once."""
    rc, _, err = rehearsed["lose_node"]
    assert rc == 0, err[-3000:]
    killed = re.search(r"rehearsal: killed node (\w+)", err)
    assert killed, err[-3000:]
    after = err[killed.end():]  # a pass that failed on a loss before the kill (seen once) is run again, as it should
    lost = re.findall(r"attack:pgd: an actor was lost on (?:node (\w+)|a node \(before its first batch\)); "
                      r"restarted on node (\w+), it ran the batch it held again \(2 images\); \d loss\(es\) in the "
                      r"last hour", after)
    assert len(lost) == 1 and lost[0][0] in ("", killed[1]) and lost[0][1] != killed[1], err[-3000:]
    assert re.search(r"attack:pgd: \d batch\(es\) on \d+ node\(s\) by \d+ actor\(s\); 1 run again after a lost actor",
                     err), err[-3000:]
    assert "running again on the images without a record" not in after  # the kill did not fail the pass
    summary = json.loads((rehearsed["out"] / "n" / "summary.json").read_text())
    assert summary["images"] == 12


def test_requests_no_node_type_can_hold_are_refused_at_once(rehearsed):
    """With the node types known (DEBM_AUTOSCALER_CONFIG, as on a launcher's head): what neither the alive nodes
    nor any type can hold fails in one line naming the field, where it used to hang (an actor pool) or wait out
    ray.startup_timeout_s (training)."""
    rc, seconds, _ = rehearsed["cpus_per_actor"]
    assert rc == 2 and last_line(rehearsed["cpus_per_actor"]) == (
        "debm attack: ray.cpus_per_actor = 64: no node of this cluster can provide 64 CPU (the largest alive node has "
        "1, the autoscaler's largest node type 1)"), rehearsed["cpus_per_actor"]
    assert seconds < 30
    rc, seconds, _ = rehearsed["workers"]
    assert rc == 2 and last_line(rehearsed["workers"]) == (
        f"debm train-ebm: ray.workers = 3: this cluster can hold at most {GPU_NODES} of them (1 CPU, 1 GPU each, its "
        "alive nodes and every node its autoscaler may add)"), rehearsed["workers"]
    assert seconds < 30


def test_nodes_the_autoscaler_does_not_add_are_waited_for_within_the_provisioning_bound(rehearsed):
    """Without the node types (as on KubeRay) the job trusts the autoscaler, for ray.provision_timeout_s."""
    rc, seconds, err = rehearsed["bounded"]
    assert rc != 0 and "attack: the autoscaler added no room for 1 x (1 CPU, 4 GPU) within " \
                       "ray.provision_timeout_s = 3 s" in err, err[-3000:]
    assert seconds < 30


def test_driver_local_stores_are_refused_on_a_cluster_that_can_grow(rehearsed):
    """One head node at start, but the autoscaler may add more: a local output, or an MLflow store in a file, would
    be written on each node's own disk."""
    out = rehearsed["out"]
    # the nodes an earlier job had the autoscaler add may still be up: then the nodes alive already refuse it
    assert rehearsed["local_output"][0] == 2 and re.fullmatch(
        f"debm attack: output {re.escape(str(out))}/local is a local path but the cluster('s autoscaler may add nodes|"
        r" has \d+ nodes), each of which would write to its own disk: use an object store \(s3://\.\.\.\), or set "
        r"ray\.shared_filesystem=true if every node mounts this path", last_line(rehearsed["local_output"])), \
        rehearsed["local_output"]
    assert rehearsed["sqlite"][0] == 2 and re.match(
        f"debm train-ebm: mlflow.tracking_uri {re.escape(rehearsed['uri'])} is a file on the driver's disk but the "
        r"cluster('s autoscaler may add nodes| has \d+ nodes)", last_line(rehearsed["sqlite"])), rehearsed["sqlite"]


def test_training_with_two_gpu_workers_trains_on_the_nodes_the_autoscaler_added(rehearsed):
    """On the two GPU nodes the attack before it had the autoscaler add (the wait for nodes not there yet is the
    attack's, `devices.ready`, shown above); its workers hold logical GPUs and train on the CPU
    (DEBM_REHEARSAL_CPU=1)."""
    rc, _, err = rehearsed["gpu_training"]
    assert rc == 0, err[-3000:]
    assert "ebm-cpu: 2 Ray Train worker(s) on GPU (1 GPU each" in err, err[-3000:]
    assert (rehearsed["out"] / "gt" / "ebm-cpu" / "ebm.pt").exists()
