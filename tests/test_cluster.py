"""The cluster configs in cluster/: the Ray launcher config against the schema Ray ships (and Ray's own
checks), the KubeRay manifests' structure, and that what they run exists and validates. Offline: no
cloud, no Kubernetes."""
import copy
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from distributed_ebm.config import AttackConfig, load_config
from distributed_ebm.distributed.cluster import _set_by_job

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _ray_pin() -> str:
    (pin,) = re.findall(r'"ray(?:\[[^\]]*\])?==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    return pin


def _schema() -> dict:
    import ray.autoscaler
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _ray_checks(config: dict) -> None:
    """What `ray up` checks before it touches AWS: defaults merged, then the schema and Ray's own rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_config_passes_rays_schema_and_checks():
    config = _launcher()
    jsonschema.validate(config, _schema())
    _ray_checks(config)


def _broken(edit):
    config = _launcher()
    edit(config)
    return config


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="one"),
     "'one' is not of type 'integer'"),
    (lambda c: c.pop("provider"), "'provider' is a required property"),
    (lambda c: c.update(max_worker=8), "'max_worker' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), "'node_config' is a required property"),
    (lambda c: c.update(idle_timeout_minutes="ten"), "'ten' is not of type 'number'"),
])
def test_a_broken_copy_fails_the_schema_naming_the_fault(edit, named):
    config = _broken(edit)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(config, _schema())
    assert named in str(err.value)
    with pytest.raises(Exception):
        _ray_checks(config)


def test_a_head_type_that_does_not_exist_fails_rays_checks():
    config = _broken(lambda c: c.update(head_node_type="cpu_head"))
    jsonschema.validate(config, _schema())  # the schema cannot see it ...
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_checks(config)  # ... Ray's own check does


def test_launcher_config_shape():
    config = _launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and head["resources"]["CPU"] > 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= config["max_workers"] for t in gpu)
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values()), "S3 through instance profiles"
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    # nothing installed at boot: every node runs the image baked from cluster/Dockerfile (Ray's pin, the project),
    # the one the KubeRay pods run
    commands = [c for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                            "worker_setup_commands") for c in config[k]]
    assert not any("pip install" in c for c in commands), commands
    assert config["rsync_filter"] == [".gitignore"]
    raycluster, _, _ = _manifests()
    (image,) = {c["image"] for c in _containers(raycluster["spec"])}
    docker = config["docker"]
    assert docker["head_image"] == docker["worker_image"] == image
    assert re.search(rf"^FROM rayproject/ray:{re.escape(_ray_pin())}-py3\d+-gpu$", (CLUSTER / "Dockerfile").read_text(),
                     re.M)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)


def _manifests():
    cluster_docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()))
    (raycluster,) = [d for d in cluster_docs if d["kind"] == "RayCluster"]
    (account,) = [d for d in cluster_docs if d["kind"] == "ServiceAccount"]
    rayjob = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    return raycluster, account, rayjob


def _containers(spec):
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_raycluster_manifest():
    raycluster, account, _ = _manifests()
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["metadata"]["name"]
    spec = raycluster["spec"]
    assert spec["rayVersion"] == _ray_pin() and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = spec["workerGroupSpecs"]
    assert (gpu["groupName"] and 0 == gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
            and gpu["maxReplicas"] >= 1)
    for container in gpu["template"]["spec"]["containers"]:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    images = {c["image"] for c in _containers(spec)}
    assert len(images) == 1, images
    # every pod: the S3 service account, and where the data and the MLflow server are
    for group in [spec["headGroupSpec"], gpu]:
        assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    for container in _containers(spec):
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DEBM_SHARED"].startswith("s3://") and env["MLFLOW_TRACKING_URI"].startswith("http")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


def test_rayjob_runs_the_evaluation_job_on_the_same_cluster_spec():
    raycluster, _, rayjob = _manifests()
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["rayClusterSpec"] == raycluster["spec"]
    python, job, flag, config, *overrides = shlex.split(spec["entrypoint"])
    assert (python, job, flag) == ("python", "jobs/attack.py", "--config")
    assert (REPO / job).is_file() and (REPO / config).is_file()
    # the entrypoint's config and overrides validate as the job will read them (DEBM_SHARED from the pods)
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in head["env"]}
    old = os.environ.get("DEBM_SHARED")
    os.environ["DEBM_SHARED"] = env["DEBM_SHARED"]
    try:
        cfg = load_config(AttackConfig, REPO / config, overrides)
    finally:
        if old is None:
            os.environ.pop("DEBM_SHARED")
        else:
            os.environ["DEBM_SHARED"] = old
    assert cfg.attack.mode == "bpda_eot" and cfg.ray.gpus_per_actor == 1
    assert all(u.startswith("s3://") for u in (cfg.data.path, cfg.classifier.weights, cfg.ebm, cfg.output))
    # its working_dir is the project copy inside the image
    workdir = yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {workdir}" in dockerfile and "COPY --chown=ray:users jobs jobs" in dockerfile
    assert re.search(rf"^FROM rayproject/ray:{re.escape(_ray_pin())}-py3\d+-gpu$", dockerfile, re.M)


def test_a_submitted_jobs_own_variables_are_not_forwarded_twice(monkeypatch):
    """`ray job submit --runtime-env-json '{"env_vars": ...}'`: ray.init must not set them again (Ray refuses)."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_ENDPOINT_URL": "http://s3", "DEBM_SHARED": "s3://b"}}}))
    assert _set_by_job() == {"AWS_ENDPOINT_URL", "DEBM_SHARED"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert _set_by_job() == set()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert _set_by_job() == set()


# --- which devices a job runs on (distributed/devices.py) ---------------------------------------

def test_devices_follow_the_request_and_the_autoscalers_node_types():
    """The decision alone, with cluster/aws.yaml's node types (its GPU workers scale up from zero): `auto` counts
    the GPUs the autoscaler can add, not only those present when the job starts (none on a fresh autoscaling
    cluster, which would leave the job on the head's CPUs)."""
    from distributed_ebm.distributed.devices import node_types, plan
    from distributed_ebm.errors import InputError

    types = node_types(str(CLUSTER / "aws.yaml"))
    assert {"CPU": 4.0, "GPU": 1.0} in types
    head_only, with_gpu = [{"CPU": 8.0}], [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 1.0}]
    auto_fresh = plan(None, "ray.gpus_per_actor", head_only, types)
    assert (auto_fresh.gpus, auto_fresh.waits) == (1.0, True) and "autoscaler is to add" in auto_fresh.where
    assert plan(None, "ray.use_gpu", with_gpu, types) == plan(1.0, "ray.use_gpu", with_gpu, None)
    assert plan(1.0, "ray.use_gpu", with_gpu, None).waits is False
    assert plan(None, "ray.gpus_per_actor", head_only, None).where.startswith("CPU (the cluster has no GPU")
    assert plan(0.0, "ray.gpus_per_actor", with_gpu, types).gpus == 0.0  # asked for the CPU: the CPU
    with pytest.raises(InputError, match=r"ray.use_gpu = 1: no node of this cluster can provide 1 GPU \(the most any "
                                         r"alive node holds: 0\), and it has no autoscaler that could add one"):
        plan(1.0, "ray.use_gpu", head_only, None)
    with pytest.raises(InputError, match="its autoscaler has no node type that could"):
        plan(2.0, "ray.gpus_per_actor", with_gpu, types)


def test_an_autoscaler_that_does_not_say_what_it_can_add_is_waited_for_when_gpus_are_named():
    """KubeRay's head has no launcher config: its autoscaler runs (found through the GCS) without naming its node
    types. A job that names its GPUs waits for them (bounded) instead of refusing; `auto` stays on the CPU."""
    from distributed_ebm.distributed.devices import plan

    named = plan(1.0, "ray.gpus_per_actor", [{"CPU": 4.0}], None, grows=True)
    assert (named.gpus, named.waits) == (1.0, True) and "does not say what it can add" in named.where
    auto = plan(None, "ray.use_gpu", [{"CPU": 4.0}], None, grows=True)
    assert auto.gpus == 0.0 and "name ray.use_gpu to wait for one" in auto.where


def test_requests_no_node_and_no_node_type_can_hold_are_refused_naming_the_field():
    from distributed_ebm.distributed.devices import Capacity, check_fits, type_limits
    from distributed_ebm.errors import InputError

    keys = {"CPU": "ray.cpus_per_actor", "GPU": "ray.gpus_per_actor"}
    aws = Capacity([{"CPU": 8.0}], type_limits(str(CLUSTER / "aws.yaml")), True)
    gpu_types = [t for t, _ in aws.types if t.get("GPU")]
    check_fits({"CPU": 1.0, "GPU": 1.0}, keys, aws)  # a GPU node type holds it
    biggest_type = max(t.get("CPU", 0.0) for t, _ in aws.types)
    with pytest.raises(InputError) as err:
        check_fits({"CPU": 64.0, "GPU": 0.0}, keys, aws)
    assert str(err.value) == (f"ray.cpus_per_actor = 64: no node of this cluster can provide 64 CPU (the largest alive "
                              f"node has 8, the autoscaler's largest node type {biggest_type:g})")
    with pytest.raises(InputError, match=r"^ray.cpus_per_actor = 8: no node of this cluster can provide 8 CPU together "
                                         r"with ray.gpus_per_actor = 1 "):
        check_fits({"CPU": 8.0, "GPU": 1.0}, keys, aws)  # the head has 8 CPUs, a GPU node fewer
    most = sum(n for t, n in aws.types if t.get("GPU"))
    with pytest.raises(InputError, match=rf"^ray.workers = {most + 1}: this cluster can hold at most {most} of them "):
        check_fits({"CPU": 1.0, "GPU": 1.0}, keys, aws, count=most + 1, count_key="ray.workers")
    assert gpu_types
    fixed = Capacity([{"CPU": 2.0}], None, False)
    with pytest.raises(InputError, match=r"^ray.workers = 4: this cluster can hold at most 2 of them \(1 CPU each, its "
                                         r"alive nodes, and it has no autoscaler\)$"):
        check_fits({"CPU": 1.0, "GPU": 0.0}, {"CPU": "ray.cpus_per_worker"}, fixed, count=4, count_key="ray.workers")
    # an autoscaler that does not say what it can add: trusted (the job waits, bounded)
    check_fits({"CPU": 64.0, "GPU": 8.0}, keys, Capacity([{"CPU": 2.0}], None, True), count=100,
               count_key="ray.workers")


def test_the_attacks_pool_grows_to_what_the_cluster_can_hold():
    from distributed_ebm.distributed.devices import Capacity, pool_limit, type_limits

    aws = Capacity([{"CPU": 8.0}], type_limits(str(CLUSTER / "aws.yaml")), True)
    gpus = sum(n * int(t.get("GPU", 0)) for t, n in aws.types)
    assert pool_limit({"CPU": 1.0, "GPU": 1.0}, aws) == gpus  # every GPU the autoscaler may add, one actor each
    assert pool_limit({"CPU": 2.0, "GPU": 0.0}, Capacity([{"CPU": 4.0}, {"CPU": 3.0}], None, False)) == 3
    assert pool_limit({"CPU": 1.0, "GPU": 1.0}, Capacity([{"CPU": 2.0}], None, True)) is None  # does not say


def test_losses_are_counted_per_node_and_hour():
    from distributed_ebm.distributed.attack import NodeLosses
    from distributed_ebm.errors import JobFailed

    now = [0.0]
    losses = NodeLosses(limit=2, clock=lambda: now[0])
    assert losses.batch("a1", "n1", False, 10) is None and losses.batch("a2", "n1", False, 10) is None
    now[0] = 100.0  # node n1 is lost with both its actors; they come back on n2
    line = losses.batch("a1", "n2", True, 10)
    assert line.startswith("an actor was lost on node n1; restarted on node n2, it ran the batch it held again "
                           "(10 images); 1 loss(es) in the last hour (ray.max_failures = 2 per hour)"), line
    assert losses.batch("a2", "n2", True, 7).endswith("1 loss(es) in the last hour (ray.max_failures = 2 per hour)")
    assert losses.redone == 2 and len(losses.events) == 1  # one node, one loss
    now[0] = 200.0
    assert "2 loss(es)" in losses.batch("a1", "n3", True, 10)  # n2 lost
    now[0] = 3750.0  # the first loss is more than an hour old
    assert "2 loss(es)" in losses.batch("a1", "n4", True, 10)  # n3 lost
    now[0] = 3760.0
    with pytest.raises(JobFailed, match=r"3 loss\(es\) in the last hour \(ray.max_failures = 2 per hour\): too many"):
        losses.batch("a1", "n5", True, 10)


def test_local_outputs_and_file_tracking_stores_are_refused_where_work_runs_on_other_nodes(monkeypatch):
    """On a cluster of one node at start whose autoscaler may add more, as on one of several nodes."""
    import ray

    from distributed_ebm.distributed import cluster, ray_private
    from distributed_ebm.errors import InputError

    nodes = [{"Alive": True}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    grows = []
    monkeypatch.setattr(ray_private, "autoscaler_runs", lambda: bool(grows))
    cluster.check_one_storage("/tmp/out", "output", False)  # one node, fixed
    cluster.check_tracking_reach("sqlite:////tmp/m.db", False)
    grows.append(True)
    with pytest.raises(InputError,
                       match=r"^output /tmp/out is a local path but the cluster's autoscaler may add nodes"):
        cluster.check_one_storage("/tmp/out", "output", False)
    with pytest.raises(InputError, match=r"^mlflow.tracking_uri sqlite:////tmp/m.db is a file on the driver's disk but "
                                         r"the cluster's autoscaler may add nodes"):
        cluster.check_tracking_reach("sqlite:////tmp/m.db", False)
    cluster.check_one_storage("s3://b/out", "output", False)
    cluster.check_one_storage("/tmp/out", "output", True)  # the user vouches for a shared filesystem
    cluster.check_tracking_reach("http://mlflow:5000", False)
    grows.clear()
    nodes.append({"Alive": True})
    with pytest.raises(InputError, match=r"^mlflow.tracking_uri file:///tmp/mlruns is a file on the driver's disk but "
                                         r"the cluster has 2 nodes"):
        cluster.check_tracking_reach("file:///tmp/mlruns", False)


def test_a_workers_mlflow_outage_costs_metrics_never_the_run(capsys):
    from distributed_ebm.distributed.ray_train import SafeLogger

    calls = []

    class Down:
        def metrics(self, values, step):
            calls.append(step)
            raise ConnectionError("mlflow is down\nmore")

        def file(self, name, data, folder=None):
            raise OSError("no space")

    logger = SafeLogger(Down)
    for step in range(3):
        logger.metrics({"loss": 1.0}, step)
    logger.file("x.png", b"", "samples")
    assert calls == [0, 1, 2]  # each one still tried
    err = capsys.readouterr().err
    assert err.count("mlflow: logging failed") == 1 and "(ConnectionError: mlflow is down);" in err
    unreachable = SafeLogger(lambda: (_ for _ in ()).throw(ConnectionError("no server")))
    unreachable.metrics({"loss": 1.0}, 0)  # made nothing, logs nothing, raises nothing


def test_the_output_preflight_writes_to_know(tmp_path):
    """os.access answers yes to root everywhere: the preflight writes a file and removes it."""
    from distributed_ebm.errors import InputError
    from distributed_ebm.store.storage import check_destination

    with pytest.raises(InputError, match=r"^output /proc/x: nothing can be written in /proc/x"):
        check_destination("/proc/x", "output", folder=True)
    with pytest.raises(InputError, match=r"^--plot /proc/x/p.png: nothing can be written in /proc/x"):
        check_destination("/proc/x/p.png", "--plot")
    check_destination(str(tmp_path / "a" / "b"), "output", folder=True)
    assert os.listdir(tmp_path) == []  # the folders it made, and its probe, removed again
    (tmp_path / "out").mkdir()
    check_destination(str(tmp_path / "out"), "output", folder=True)
    assert os.listdir(tmp_path / "out") == []


def test_the_driver_sees_an_object_another_process_wrote_after_it_listed_the_folder(s3_bucket):
    """s3fs caches a folder's listing: the driver's `exists(diverged.txt)` after a training run answered from the
    listing made before it, which lacked the file a worker wrote."""
    import boto3

    from distributed_ebm.store import storage

    folder = f"{s3_bucket}/listed"
    storage.write_bytes(f"{folder}/a.txt", b"a")
    fs, path = storage.filesystem(folder)
    fs.ls(path)  # the listing, cached
    assert not storage.exists(f"{folder}/diverged.txt")
    boto3.client("s3").put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="listed/diverged.txt", Body=b"x")
    assert storage.exists(f"{folder}/diverged.txt")


# --- the shipped configs against the clusters they are shipped for ----------------------------------

def _kuberay_capacity(spec: dict):
    """The head pod as the alive node, each worker group as a node type (its pod's CPUs and GPUs, maxReplicas)."""
    from distributed_ebm.distributed.devices import Capacity

    def resources(group: dict) -> dict:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        params = group.get("rayStartParams") or {}
        return {"CPU": float(params.get("num-cpus", limits["cpu"])),
                "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    return Capacity([resources(spec["headGroupSpec"])],
                    [(resources(g), int(g["maxReplicas"])) for g in spec["workerGroupSpecs"]], True)


def _launcher_capacity():
    from distributed_ebm.distributed.devices import Capacity, type_limits

    config = _launcher()
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    return Capacity([{k: float(v) for k, v in head.items()}], type_limits(str(CLUSTER / "aws.yaml")), True)


def _job_configs():
    """Every shipped job config, read as its job reads it (DEBM_SHARED as on the clusters)."""
    from distributed_ebm.config import (
        QuickstartConfig,
        TrainClassifierConfig,
        TrainEBMConfig,
        TunePurificationConfig,
        TuneTrainingConfig,
    )

    kinds = [("attack_", AttackConfig), ("train_ebm", TrainEBMConfig), ("train_classifier", TrainClassifierConfig),
             ("tune_purification", TunePurificationConfig), ("tune_training", TuneTrainingConfig),
             ("quickstart", QuickstartConfig)]
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        (cls,) = [c for prefix, c in kinds if path.name.startswith(prefix)]
        yield path, load_config(cls, path, [])


def _requests(cfg, where: str = ""):
    """(bundle per worker or actor, keys, count, count key) of every Ray section of a config, nested ones too."""
    from pydantic import BaseModel

    from distributed_ebm.config.common import RayConfig, TrainRayConfig

    for name, value in cfg:
        key = f"{where}{name}"
        if isinstance(value, TrainRayConfig):
            gpus = 1.0 if value.use_gpu else 0.0
            yield ({"CPU": value.cpus_per_worker, "GPU": gpus},
                   {"CPU": f"{key}.cpus_per_worker", "GPU": f"{key}.use_gpu"}, value.workers, f"{key}.workers")
        elif isinstance(value, RayConfig):
            yield ({"CPU": value.cpus_per_actor, "GPU": value.gpus_per_actor or 0.0},
                   {"CPU": f"{key}.cpus_per_actor", "GPU": f"{key}.gpus_per_actor"}, value.actors or 1,
                   f"{key}.actors")
        elif isinstance(value, BaseModel):
            yield from _requests(value, f"{key}.")


def test_every_shipped_job_config_fits_every_shipped_cluster_and_they_reach_32_gpus():
    """What a config asks of each worker or actor (CPUs, GPUs) fits a node type of cluster/aws.yaml and a pod of
    cluster/kuberay/ (before: train_ebm_cifar10 asked 4 CPUs of GPU pods that have 3), as many as it names; the
    RayJob's own entrypoint too; and each cluster grows to 32 GPUs."""
    from distributed_ebm.distributed.devices import check_fits

    raycluster, _, rayjob = _manifests()
    clusters = {"aws.yaml": _launcher_capacity(), "raycluster.yaml": _kuberay_capacity(raycluster["spec"]),
                "rayjob.yaml": _kuberay_capacity(rayjob["spec"]["rayClusterSpec"])}
    for name, cap in clusters.items():
        assert sum(t.get("GPU", 0.0) * n for t, n in cap.types) >= 32, name
    old = os.environ.get("DEBM_SHARED")
    os.environ["DEBM_SHARED"] = "s3://bucket/shared"
    try:
        configs = list(_job_configs())
        _, _, _, config, *overrides = shlex.split(rayjob["spec"]["entrypoint"])
        configs.append(("rayjob entrypoint", load_config(AttackConfig, REPO / config, overrides)))
    finally:
        if old is None:
            os.environ.pop("DEBM_SHARED")
        else:
            os.environ["DEBM_SHARED"] = old
    checked = 0
    for path, cfg in configs:
        for bundle, keys, count, count_key in _requests(cfg):
            for name, cap in clusters.items():
                try:
                    check_fits(bundle, keys, cap, count, count_key)
                except Exception as err:
                    raise AssertionError(f"{path} on {name}: {err}") from None
                checked += 1
    assert checked >= 3 * len(configs)


@pytest.mark.parametrize("cpus, named", [(4.0, "ray.cpus_per_worker = 4"), (1.0, None)])
def test_the_fit_check_sees_a_config_asking_more_than_a_gpu_pod_has(cpus, named):
    """The check above can fail: 4 CPUs per GPU worker on KubeRay's 3-CPU GPU pods (the head has 4, no GPU)."""
    from distributed_ebm.distributed.devices import check_fits
    from distributed_ebm.errors import InputError

    raycluster, _, _ = _manifests()
    cap = _kuberay_capacity(raycluster["spec"])
    keys = {"CPU": "ray.cpus_per_worker", "GPU": "ray.use_gpu"}
    if named is None:
        check_fits({"CPU": cpus, "GPU": 1.0}, keys, cap, 1, "ray.workers")
        return
    with pytest.raises(InputError, match=named):
        check_fits({"CPU": cpus, "GPU": 1.0}, keys, cap, 1, "ray.workers")
