"""The method: networks, keyed noise, Langevin sampler, bank, defense, exact chain, attacks, training steps.

Plain PyTorch that knows nothing of Ray, MLflow, storage or configs (the bottom layer but errors)."""
