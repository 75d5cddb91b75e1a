"""The committed EBM (models/ebm-cifar10-cpu) loads with the project's loader and gives, on the 40 exact test
images RESULTS.md uses, both natural figures of the committed summary that RESULTS.md reports them from."""
import json
from pathlib import Path

import pytest

from distributed_ebm.config import AttackConfig, load_config
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.method.nets import EBM
from distributed_ebm.recipes.attack import run_attack
from distributed_ebm.store.released import load_ebm

# RESULTS.md's counting table, row "CPU LeakyReLU EBM, 8/255, reduced counting"
# (benchmarks/experiments/counting_table.sh)
SUMMARY = Path("results/counting/cpu_lrelu_8_reduced.json")


@pytest.mark.slow  # a minute of the committed EBM's chains: outside the inner loop (`-m "not ray and not slow"`)
def test_committed_ebm_gives_the_committed_summarys_natural_figures(tmp_path):
    committed = json.loads(SUMMARY.read_text())
    images, attack = committed["images"], committed["config"]["attack"]
    cfg = load_config(AttackConfig, "jobs/configs/results/defended_bpda_eot.yaml",
                      ["attack.mode=defense", "attack.reevaluations=0", f"data.random={images}",
                       f"purify.steps={committed['config']['purify']['steps']}",
                       f"attack.eot_attack={attack['eot_attack']}", f"attack.eot_defense={attack['eot_defense']}",
                       f"output={tmp_path}/natural", "mlflow.enabled=false"])
    assert cfg.seed == committed["config"]["seed"]
    assert cfg.data.subset_seed == committed["config"]["data"]["subset_seed"]
    ebm = load_ebm(cfg.ebm, image_size=32)
    assert isinstance(ebm, EBM) and ebm.width == 32 and sum(p.numel() for p in ebm.parameters()) == 693_569
    summary = run_attack(cfg, OneProcess(), show=False)
    assert summary["images"] == images == 40
    # point 0 (the clean image) is judged with the same keys in mode defense as in the attack that wrote the summary
    for figure in ("natural_protocol_accuracy", "natural_defense_accuracy"):
        assert round(summary[figure] * images) == round(committed[figure] * images), figure
    assert committed["natural_defense_accuracy"] <= committed["natural_protocol_accuracy"]
