"""Ray adapters around the plain-PyTorch method: evaluation on Ray Data (and, later, training on Ray Train,
search on Ray Tune)."""
