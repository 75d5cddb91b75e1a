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
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="one"), "'one' is not of type 'integer'"),
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
    # the project installed on every node from the copy file_mounts puts there
    (project,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any("pip install" in c and project in c for c in config["setup_commands"])
    assert config["rsync_filter"] == [".gitignore"]
    # Ray's version everywhere is the project's pin; token auth with the token shipped to every node
    pin = _ray_pin()
    docker = config["docker"]
    assert docker["head_image"].startswith(f"rayproject/ray:{pin}-") and docker["worker_image"].startswith(f"rayproject/ray:{pin}-")
    assert docker["worker_image"].endswith("-gpu")
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
    assert gpu["groupName"] and 0 == gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] >= 1
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
    env = {e["name"]: e["value"] for e in raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
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
