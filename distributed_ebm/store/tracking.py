"""MLflow: one run per job, so runs are compared side by side in the MLflow UI.

Tracking URI: the config's, else MLFLOW_TRACKING_URI, else a local SQLite store at
<cwd>/runs/mlflow.db with artifacts in <cwd>/runs/mlartifacts (absolute paths, so Ray workers
and Tune trials, whose working directories differ, write to the same store).
"""
from __future__ import annotations

import contextlib
import os
import tempfile

from ..config import MLflowConfig
from ..errors import InputError
from . import storage
from .provenance import flat


def tracking_uri(cfg: MLflowConfig) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath("runs/mlflow.db")


def check_tracking(cfg: MLflowConfig) -> None:
    """Ask the tracking store once, without retries, before the work (not after it)."""
    if not cfg.enabled:
        return
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"mlflow.tracking_uri {uri}: not a usable tracking store ({first[:200]}); "
                         "use sqlite:///PATH.db or http://HOST:PORT, or mlflow.enabled=false") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def mlflow_run(cfg: MLflowConfig, run_name: str, params: dict, tags: dict | None = None, run_id: str | None = None):
    """Start (or, given run_id, continue) a run in cfg.experiment; yields the mlflow module."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = cfg.artifact_location or ("file://" + os.path.abspath("runs/mlartifacts")
                                             if not uri.startswith(("http", "databricks")) else None)
        mlflow.create_experiment(cfg.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run_name or run_name, tags=tags):
        if run_id is None:  # a continued run keeps the params it started with
            mlflow.log_params({k: "null" if v is None else str(v)[:6000] for k, v in flat(params).items()})
        yield mlflow


class RunLogger:
    """Logs to an existing run from any process (a Ray Train worker), by run id."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    @classmethod
    def child(cls, uri: str, parent_run_id: str, experiment_id: str, name: str, params: dict) -> "RunLogger":
        """The child run `name` of a parent run (found again when a resumed search restarts the trial)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        found = client.search_runs([experiment_id], filter_string=f"tags.trial = '{name}' and "
                                   f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        if found:
            return cls(uri, found[0].info.run_id)
        run = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, "trial": name})
        for k, v in params.items():
            client.log_param(run.info.run_id, k, v)
        return cls(uri, run.info.run_id)

    def metrics(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def file(self, name: str, data: bytes, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, path, folder)


def log_url_artifacts(mlflow, urls: list[str], folder: str | None = None) -> None:
    """Copy files from any URL (local or s3://) into the active run's artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        for url in urls:
            if storage.exists(url):
                local = os.path.join(tmp, os.path.basename(url))
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(url))
                mlflow.log_artifact(local, folder)


def log_torch_model(model, name: str, image_shape: tuple[int, int, int]) -> None:
    """`model` (images of `image_shape`, C x H x W, in) as an MLflow model of the active run, its signature from a
    batch of 2 zeros (so torch.export keeps the batch dimension dynamic; 1 would pin it). MLflow saves it as a traced
    graph (pt2, loaded without this project's classes and without unpickling), so its requirements are the pytorch
    flavor's own list (torch, cloudpickle; MLflow adds itself): left to infer them, MLflow would load the model again
    in a fresh Python to see what it imports, which costs more than the logging itself."""
    import mlflow.pytorch
    import numpy as np

    example = np.zeros((2, *image_shape), dtype=np.float32)
    mlflow.pytorch.log_model(model, name=name, input_example=example,
                             pip_requirements=mlflow.pytorch.get_default_pip_requirements())
