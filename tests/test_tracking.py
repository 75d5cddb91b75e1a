"""MLflow on a local SQLite store: what a job logs can be read back."""
import os

import torch

from distributed_ebm.config import MLflowConfig
from distributed_ebm.store.tracking import log_torch_model, mlflow_run

from .conftest import tiny_ebm


def test_a_logged_model_loads_back_and_names_the_flavors_requirements(tmp_path):
    """Requirements are the pytorch flavor's own list, not inferred: inference loads the model again in a fresh
    Python and finds nothing pip could install beyond it."""
    import mlflow.pytorch

    ebm = tiny_ebm(scale=20)
    cfg = MLflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "art"),
                       experiment="models")
    with mlflow_run(cfg, "model-test", {}) as mlflow:
        log_torch_model(ebm, "ebm", (3, 32, 32))
        run_id = mlflow.active_run().info.run_id
    folder = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/ebm", dst_path=str(tmp_path / "got"))
    with open(os.path.join(folder, "requirements.txt")) as f:
        names = sorted(line.split("==")[0] for line in f.read().split())
    assert names == ["cloudpickle", "mlflow", "torch"]
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/ebm")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), ebm(x))
