"""The committed EBM (models/ebm-cifar10-cpu) loads with the project's loader and gives the defended
natural accuracy that RESULTS.md states, on the 40-image subset RESULTS.md names."""
import re
from pathlib import Path

from distributed_ebm.config import AttackConfig, load_config
from distributed_ebm.local.attack import run_attack
from distributed_ebm.method.nets import EBM, load_ebm


def test_committed_ebm_gives_the_natural_accuracy_results_md_states(tmp_path):
    stated = re.search(r"natural-accuracy check: (\d+)/(\d+) images", Path("RESULTS.md").read_text(), re.IGNORECASE)
    assert stated, "RESULTS.md states the natural-accuracy check"
    correct, images = map(int, stated.groups())
    cfg = load_config(AttackConfig, "jobs/configs/results/defended_bpda_eot.yaml",
                      ["attack.mode=defense", "attack.reevaluations=0", f"data.random={images}",
                       f"output={tmp_path}/natural", "mlflow.enabled=false"])
    ebm = load_ebm(cfg.ebm, image_size=32)
    assert isinstance(ebm, EBM) and ebm.width == 32 and sum(p.numel() for p in ebm.parameters()) == 693_569
    summary = run_attack(cfg, show=False)
    assert summary["images"] == images
    assert round(summary["natural_accuracy"] * images) == correct
