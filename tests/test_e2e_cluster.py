"""End to end, the way cluster/README.md runs the project, all on 127.0.0.1: a Ray head started with
`ray start --head`, an S3 endpoint (moto in server mode) holding the data, the weights and every
output, and an MLflow tracking server whose artifacts live on that S3. The three jobs go through
`ray job submit --working-dir .` with tiny settings: train an EBM, search the purifier for it,
attack with the settings found. Every service is a process of its own (its own session), stopped by
process id at the end; the test checks that none of them is left running.

Its time is nearly all fixed costs: Ray and MLflow start-up, and in each job the imports, Ray Train's and
Ray Data's set-up, MLflow's model logging (measured times: benchmarks/README.md, "Test suite and quickstart
times"). Run it alone with `pytest -m e2e`, leave it out with `-m "not e2e"`.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from .conftest import RESNET20, TEST_EXACT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # ray, mlflow and moto_server of the project's environment
BUCKET = "debm-e2e"
SHARED = f"s3://{BUCKET}/shared"  # DEBM_SHARED inside the jobs: the configs' data and weights resolve here
RUNS = f"s3://{BUCKET}/runs"
GRACE = 10.0  # seconds from SIGTERM to SIGKILL when a service stops (the Ray head's: 3 s)
KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra) -> dict:
    """This process's environment without what points at the other test services (the session's S3
    fixture, MLflow stores, a Ray address): each service here gets only what a cluster node would."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "DEBM_")) and k not in ("RAY_ADDRESS",)}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in an entrypoint = this env's
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


class Service:
    """A process in a new session (so every process it starts can be found and stopped), its log in a file."""

    def __init__(self, name: str, cmd: list[str], env: dict, logs: Path, grace: float = GRACE):
        self.name, self.log, self.grace = name, logs / f"{name}.log", grace
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=logs, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_until(self, url: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"{self.name} not ready at {url} after {timeout:.0f} s:\n{_tail(self.log)}")
            time.sleep(0.5)

    def members(self) -> list[int]:
        """Live processes of this service's session (zombies excluded)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid and fields[0] != "Z":
                found.append(int(entry))
        return found

    def stop(self) -> list[int]:
        """SIGTERM to every process of the service's session at once (as `ray stop` does; the MLflow CLI
        waits for its server processes rather than passing the signal on), SIGKILL to what is left after
        the service's grace period (as `ray stop` does after its own). Returns what needed SIGKILL."""
        for pid in self.members():
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + self.grace
        while self.members() and time.time() < deadline:
            time.sleep(0.2)
        killed = self.members()
        for pid in killed:
            _signal(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        return killed


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _working_in(folder: str) -> list[int]:
    """Live processes whose working directory is inside `folder` (a job driver runs in its own session,
    in the job's working_dir under Ray's temporary folder)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(folder):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _s3_client(endpoint: str):
    import boto3
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"], region_name=KEYS["AWS_DEFAULT_REGION"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("e2e")
    # Ray's temporary folder: its own (not the other Ray of this machine or session), short (socket paths)
    ray_tmp = tempfile.mkdtemp(prefix="debm-e2e-", dir="/tmp")
    services: list[Service] = []
    started = time.time()
    try:
        s3_port, mlflow_port, gcs_port, dashboard_port = (_free_port() for _ in range(4))
        endpoint = f"http://127.0.0.1:{s3_port}"
        s3_env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, **KEYS}
        # all three start at once (MLflow and Ray take the longest); the data go up while they boot
        s3 = Service("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], _clean_env(), logs)
        services.append(s3)
        mlflow = Service("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                    "--workers", "1", "--backend-store-uri", f"sqlite:///{logs}/mlflow.db",
                                    "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
                         # tracking only: without MLflow's job runner and its seven huey consumers (9 processes
                         # at start; 2 without), which serve MLflow's GenAI jobs, never ours
                         _clean_env(**s3_env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), logs)
        services.append(mlflow)
        # A head as `ray start` makes one on a cluster node; every port chosen here or by the OS, so it
        # cannot collide with another Ray on this machine.
        ray = Service("ray-head", [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                   f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                   f"--dashboard-port={dashboard_port}",
                                   f"--dashboard-agent-listen-port={_free_port()}",
                                   f"--ray-client-server-port={_free_port()}",
                                   "--min-worker-port=0", "--max-worker-port=0",
                                   "--num-cpus=2", "--num-gpus=0", "--object-store-memory=500000000",
                                   f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                      _clean_env(), logs, grace=3.0)  # once it ran jobs, its GCS outlasts any grace (>10 s)
        services.append(ray)
        s3.wait_until(endpoint + "/", 60)
        client = _s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        exact_train = TEST_EXACT.replace("test-exact-1000", "train-exact-4000")
        for local, key in ((TEST_EXACT, "shared/datasets/cifar10/test-exact-1000.parquet"),
                           (exact_train, "shared/datasets/cifar10/train-exact-4000.parquet"),
                           (RESNET20, "shared/weights/" + os.path.basename(RESNET20))):
            client.upload_file(local, BUCKET, key)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        ray.wait_until(dashboard + "/api/jobs/", 120)
        tracking = f"http://127.0.0.1:{mlflow_port}"
        mlflow.wait_until(tracking + "/health", 120)
        yield types.SimpleNamespace(
            s3=client, endpoint=endpoint, tracking=tracking, dashboard=dashboard, logs=logs, services=services,
            started=time.time() - started,
            # what `ray job submit --runtime-env-json` gives the jobs: S3 (from an instance profile on AWS,
            # here moto's keys and endpoint), the MLflow server, and the shared data's location
            job_env={"AWS_ENDPOINT_URL": endpoint, **KEYS, "MLFLOW_TRACKING_URI": tracking, "DEBM_SHARED": SHARED})
    finally:
        with ThreadPoolExecutor() as pool:  # all at once: a slow one does not hold up the others
            left = dict(zip([s.name for s in services], pool.map(Service.stop, services)))
        time.sleep(2)  # Ray's watcher kills a driver whose job supervisor is gone within a second
        left["job drivers"] = _working_in(ray_tmp)
        for pid in left["job drivers"]:
            _signal(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    stray = {name: pids for name, pids in left.items() if pids}
    if stray:  # stopped all the same (as `ray stop` does after its grace period); on a busy machine
        print(f"e2e: processes still there after their grace period ({GRACE:.0f} s, the Ray head's 3 s), killed: "
              f"{stray}")
    assert not any(s.members() for s in services) and not _working_in(ray_tmp), "processes left running"


def _submit(cluster, name: str, *entrypoint: str, timeout: float = 300) -> str:
    """`ray job submit --working-dir .` from the repository root; the job's output when it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    submission = f"e2e-{name}-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--submission-id", submission,
           "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": cluster.job_env}),
           "--", "python", *entrypoint]
    jobs = JobSubmissionClient(cluster.dashboard)
    started = time.time()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        jobs.stop_job(submission)
        pytest.fail(f"job {name} still running after {timeout} s; its log:\n{jobs.get_job_logs(submission)[-6000:]}")
    try:
        status = jobs.get_job_status(submission)
    except RuntimeError:  # no such job: `ray job submit` failed before creating it (the upload, the address)
        status = None
    assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"job {name}: `ray job submit` exit {done.returncode}, status {status}\n--- output:\n{done.stdout[-6000:]}"
        f"\n--- stderr:\n{done.stderr[-3000:]}\n--- ray head:\n{_tail(cluster.logs / 'ray-head.log', 1500)}")
    print(f"job {name}: {time.time() - started:.1f} s")
    return jobs.get_job_logs(submission)


def _keys(cluster, prefix: str) -> list[str]:
    pages = cluster.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _read(cluster, key: str) -> bytes:
    return cluster.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_train_tune_attack_as_submitted_ray_jobs(cluster):
    import torch
    from mlflow.tracking import MlflowClient

    print(f"services ready in {cluster.started:.1f} s")
    # 1. Train an EBM (2 DDP workers on Ray Train, a bank actor); checkpoints and ebm.pt to S3.
    out = _submit(cluster, "train", "jobs/train_ebm.py", "--config", "jobs/configs/train_ebm_cpu.yaml",
                  f"data.path={SHARED}/datasets/cifar10/train-exact-4000.parquet", "data.count=64",
                  "ebm.width=4", "langevin.steps=2", "batch_size=8", "bank_size=16", "iterations=4",
                  "checkpoint_every=2", "log_every=2", f"output={RUNS}", "name=ebm-e2e")
    ebm = f"{RUNS}/ebm-e2e/ebm.pt"
    assert f"EBM trained to iteration 4: {ebm}" in out
    state = torch.load(io.BytesIO(_read(cluster, "runs/ebm-e2e/ebm.pt")), weights_only=True)
    assert state["iteration"] == 4
    saved = _keys(cluster, "runs/ebm-e2e/checkpoint_")  # Ray Train's checkpoint folders: model, optimizer, bank
    assert any(k.endswith("/ckpt.pt") for k in saved) and any(k.endswith("/bank-0.pt") for k in saved), saved

    # 2. Search the purifier for that EBM (2 trials at once, each on 2 held-out training images from S3);
    #    the best settings to S3. Each trial takes its share of the cluster: one attack actor (not a pool sized to
    #    the whole cluster, over whose CPUs the trials would fight); the first line says so.
    out = _submit(cluster, "tune", "jobs/tune_purification.py", "--config", "jobs/configs/tune_purification.yaml",
                  f"attack.ebm={ebm}", "attack.data.count=2", "attack.purify.steps=2", "attack.attack.steps=1",
                  "attack.attack.eot_attack=2", "attack.attack.eot_defense=2", "attack.batch_size=2",
                  "validation.random=2", "rungs=[2]", "trials=2", "max_concurrent=2",
                  "space.steps.low=1", "space.steps.high=4", f"output={RUNS}", "name=tune-e2e",
                  f"attack.output={RUNS}/attack-e2e")
    assert f"best settings: {RUNS}/tune-e2e/best_attack.yaml" in out
    assert "tune-purification: 2 trials, 2 at a time, each evaluating with 1 attack actor(s) (1 CPU each)" in out
    trials = json.loads(_read(cluster, "runs/tune-e2e/trials.json"))
    assert len(trials) == 2 and all(t["rungs"] == 1 for t in trials), trials
    best = yaml.safe_load(_read(cluster, "runs/tune-e2e/best_attack.yaml"))
    assert best["ebm"] == ebm and best["data"]["path"] == f"{SHARED}/datasets/cifar10/test-exact-1000.parquet"
    purify = best["purify"]

    # 3. Attack with the settings found: `--config` the best-settings file as the search wrote it to S3 (the search's
    #    attack with the tuned purifier, its output included), results to S3.
    out = _submit(cluster, "attack", "jobs/attack.py", "--config", f"{RUNS}/tune-e2e/best_attack.yaml")
    assert f"results: {RUNS}/attack-e2e/records/" in out
    summary = json.loads(_read(cluster, "runs/attack-e2e/summary.json"))
    assert summary["images"] == 2 and summary["config"]["purify"] == purify
    assert _keys(cluster, "runs/attack-e2e/records/part-")
    assert _read(cluster, "runs/attack-e2e/accuracy.png")[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow: one run per job (the search with a child run per trial), artifacts through the server on S3.
    client = MlflowClient(tracking_uri=cluster.tracking)
    experiment = client.get_experiment_by_name("distributed-ebm")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    by_job = {}
    for run in runs:
        by_job.setdefault(run.data.tags.get("job", "trial"), []).append(run)
    assert sorted((job, len(r)) for job, r in by_job.items()) == [("attack", 1), ("train-ebm", 1),
                                                                   ("trial", 2), ("tune-purification", 1)], by_job
    (train,), (search,), (attack,) = by_job["train-ebm"], by_job["tune-purification"], by_job["attack"]
    assert all(t.data.tags["mlflow.parentRunId"] == search.info.run_id for t in by_job["trial"])
    assert [m.step for m in client.get_metric_history(train.info.run_id, "energy_diff")] == [2, 4]
    assert attack.data.metrics["natural_defense_accuracy"] == summary["natural_defense_accuracy"]
    assert {a.path for a in client.list_artifacts(attack.info.run_id)} >= {"summary.json", "accuracy.png"}
    stored = [os.path.basename(k) for k in _keys(cluster, "mlartifacts/")]
    assert "summary.json" in stored and "MLmodel" in stored and any(n.startswith("bank-") for n in stored), stored
