"""Shared fixtures. Paths into ../shared are the configs' defaults ($DEBM_SHARED, else ../shared),
resolved from the repository root, as the jobs do (no OmegaConf needed: the GPU machines lack it)."""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

# A parallel run (`pytest -n N`, pyproject's default: one worker per CPU) gives each worker its share of the CPUs
# as torch threads, before torch is imported (its own thread pools and those of the processes a test starts); two
# workers with two threads each on 2 CPUs ran the suite slower than one process did.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(threads)
import torch  # noqa: E402

if WORKER:
    torch.set_num_threads(threads)
REPO = Path(__file__).resolve().parents[1]
os.chdir(REPO)
# Before ray is imported anywhere (Ray 2.60 on a local cluster): no token auth, no usage stats, fast health checks.
os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"})
# Every Ray this test run starts (the session's, a job's own) keeps its files in a folder of this run's, not in the
# machine's shared /tmp/ray (short: Ray's socket paths must stay under 107 bytes); removed when the run ends. Each
# parallel worker has a folder of its own inside the run's (or inside the one the caller named).
OWN_RAY_TMPDIR = "RAY_TMPDIR" not in os.environ or WORKER is not None
if OWN_RAY_TMPDIR:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="debm-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))

from distributed_ebm.config import ClassifierConfig, DataConfig  # noqa: E402

TEST_EXACT = DataConfig().path
# The two-node tests' head (tests/two_node.py): a killed node is declared dead after 3 missed health checks a second
# apart instead of Ray's default 5 checks 3 s apart (15 s the tests would spend waiting).
QUICK_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                    "health_check_failure_threshold": 3}
RESNET20 = ClassifierConfig().weights
WEIGHTS_DIR = os.path.dirname(RESNET20)
DATA_DIR = os.path.dirname(TEST_EXACT)


@pytest.fixture(scope="session")
def exact_test():
    from distributed_ebm.store.data import read_parquet
    return read_parquet(TEST_EXACT)


@pytest.fixture(scope="session")
def resnet20():
    from distributed_ebm.store.checkpoints import load_classifier
    return load_classifier("resnet20", RESNET20)


# A test that needs a Ray, an S3 endpoint or an MLflow server: it asks for one of these fixtures, lives in one of
# these modules, or is marked `ray` itself (a job that gets as far as starting a Ray). The inner loop,
# `pytest -m "not ray and not slow"`, runs the rest but the `slow` checks of committed results: the method, the I/O,
# configs, jobs' input checks; `no_ray_started` holds it to that.
RAY_FIXTURES = {"ray_local", "s3_bucket"}
RAY_MODULES = {"test_e2e_cluster", "test_faults"}
# Module fixtures that take seconds to build: in a parallel run the tests that use one run on one worker, so it is
# built once, not once per worker. With a test that needs the session's Ray, that is the Ray's worker.
SHARED_FIXTURES = {"two_node", "runs", "first"}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: the whole workflow through `ray job submit` on real Ray, S3 and MLflow "
                                       "servers (tests/test_e2e_cluster.py, a few minutes)")
    config.addinivalue_line("markers", "ray: needs a Ray, an S3 endpoint or an MLflow server (set by conftest.py from "
                                       "the fixtures a test asks for); `-m 'not ray and not slow'` is the inner loop")


def pytest_unconfigure(config):
    if OWN_RAY_TMPDIR:  # not one the caller named
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    groups = {}  # item -> its xdist group
    for item in items:
        if (RAY_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.module.__name__.rsplit(".", 1)[-1] in RAY_MODULES):
            item.add_marker(pytest.mark.ray)
        if "ray_local" in getattr(item, "fixturenames", ()):  # one worker starts the session's Ray, and runs them all
            groups[item] = "ray_local"
    for name in SHARED_FIXTURES:
        users = [item for item in items if name in getattr(item, "fixturenames", ())]
        for module in {item.module.__name__ for item in users}:
            together = [item for item in users if item.module.__name__ == module]
            group = "ray_local" if any(groups.get(item) == "ray_local" for item in together) else f"{module}.{name}"
            groups.update(dict.fromkeys(together, group))
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(group))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_ebm(width: int = 4, seed: int = 0, scale: float = 1.0):
    """A small random EBM; `scale` multiplies its energy so gradients matter at s = 1."""
    from distributed_ebm.method.nets import EBM
    torch.manual_seed(seed)
    ebm = EBM(width=width)
    with torch.no_grad():
        ebm.net[-1].weight.mul_(scale)
    return ebm


def own_processes(marker: bytes) -> list[int]:
    """Live processes started from this test process (its own Ray's workers among them) whose command line holds
    `marker`: never another Ray's on the machine, a parallel test worker's or another run's."""
    parent, found = {}, []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    parent[int(entry)] = int(fields[1])
            except OSError:
                pass
    me = os.getpid()
    for pid in parent:
        up = parent.get(pid)
        while up not in (None, 0, 1, me):
            up = parent.get(up)
        if up == me:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker in f.read():
                        found.append(pid)
            except OSError:
                pass
    return sorted(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3-compatible endpoint (moto server mode) on 127.0.0.1 and an empty bucket in it."""
    from moto.server import ThreadedMotoServer
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    boto3.client("s3").create_bucket(Bucket="debm-test")
    yield "s3://debm-test"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_bucket, request):
    """One real local Ray for the whole session (2 CPUs); started after the S3 variables are set, so every worker
    inherits the same endpoint (no runtime env: it would start each worker through one more Python process). Idle
    task workers are kept (8, for 5 minutes, instead of 2 for 1 s), so that each Ray Data pass reuses the
    processes that read the last one's files instead of starting and importing new ones. Actors get processes of
    their own either way."""
    if getattr(request.config.option, "loadgroup", False):  # a parallel run: this worker runs every test on it
        lost = [item.nodeid for item in request.session.items
                if "ray_local" in item.fixturenames and "@" not in item.nodeid]
        if lost:  # pytest 9.2 with pytest-xdist 3.8 stopped grouping (pytest-dev/pytest-xdist#1386), silently
            pytest.fail(f"pytest-xdist ignored the xdist_group marks (e.g. {lost[0]}), so each worker would start a "
                        "Ray claiming every CPU: install the pytest version pyproject.toml allows, or run with -n 0")
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 300_000})
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_ray_started(request, monkeypatch):
    """A test not marked `ray` may not start a Ray in this process, so the fast loop stays without one."""
    if request.node.get_closest_marker("ray") is None:
        import ray

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a Ray: mark it `ray` (tests/conftest.py)")
        monkeypatch.setattr(ray, "init", refuse)
    yield


@pytest.fixture(autouse=True)
def ray_resources_returned(request):
    """A test on the session's Ray gives back every CPU it took: otherwise the tests after it starve and fail
    far from the cause. The test that kept them fails here, naming what is still alive."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    if getattr(request.config.option, "loadgroup", False) and "@ray_local" not in request.node.nodeid:  # at run time
        pytest.fail("a test outside the ray_local group started the session's Ray on a worker of its own: ask for "
                    "ray_local as a parameter, not with request.getfixturevalue")
    import ray
    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < total:
        if time.monotonic() > deadline:
            from ray._private import state
            actors = [f"{a.get('ActorClassName')} {a.get('Name') or ''} ({a.get('State')}, pid {a.get('Pid')})"
                      for a in state.actors().values() if a.get("State") != "DEAD"]
            groups = [f"{g.get('name') or pg_id} {g.get('state')} {g.get('bundles')}"
                      for pg_id, g in ray.util.placement_group_table().items() if g.get("state") != "REMOVED"]
            pytest.fail(f"{ray.available_resources().get('CPU', 0):g} of {total:g} CPUs free 60 s after the test; "
                        f"alive actors: {actors}; placement groups: {groups}")
        time.sleep(0.2)
