"""Input and output: data, URLs and atomic writes, checkpoints, provenance, MLflow tracking."""
