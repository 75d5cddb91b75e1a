"""The README's end-to-end run: train a small EBM, then secure the pretrained ResNet-20 with it."""
from __future__ import annotations

import json

from .config import QuickstartConfig
from .distributed.attack import RayActors
from .distributed.train import train_ebm_on_ray
from .recipes.attack import run_attack
from .results.report import format_table, plot_curves
from .store import storage
from .store.tracking import tracking_uri


def quickstart(cfg: QuickstartConfig) -> list[dict]:
    """Train on Ray Train, then evaluate on the Ray Data engine (a local Ray unless RAY_ADDRESS is set)."""
    train = cfg.train.model_copy(update={"output": cfg.output, "name": "ebm"})
    print(f"1/3 training a small EBM ({train.iterations} iterations) -> {train.output}/ebm", flush=True)
    ebm_url = train_ebm_on_ray(train)["ebm"]
    summaries = []
    for i, mode in enumerate(("pgd", "bpda_eot"), start=2):
        attack = cfg.attack.model_copy(update={
            "ebm": ebm_url, "output": storage.join(cfg.output, mode),
            "attack": cfg.attack.attack.model_copy(update={"mode": mode})})
        what = "undefended, PGD" if mode == "pgd" else "defended by the EBM, BPDA+EOT"
        print(f"{i}/3 attacking the classifier {what} -> {attack.output}", flush=True)
        summaries.append(run_attack(attack, RayActors()))
    table = format_table(summaries)
    plot_curves(summaries, storage.join(cfg.output, "accuracy.png"))
    storage.write_bytes(storage.join(cfg.output, "table.txt"), (table + "\n").encode())
    storage.write_bytes(storage.join(cfg.output, "summaries.json"), json.dumps(summaries, indent=2).encode())
    print("\n" + table + f"\n\nplot: {cfg.output}/accuracy.png")
    if cfg.attack.mlflow.enabled:
        print(f"MLflow runs: .venv/bin/mlflow ui --backend-store-uri {tracking_uri(cfg.attack.mlflow)}  "
              "(then open http://127.0.0.1:5000)")
    return summaries
