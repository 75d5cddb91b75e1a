"""What a researcher reads: the progress line counts every image of the run, not one batch's."""
from distributed_ebm.config import AttackConfig, load_config
from distributed_ebm.local.attack import OneProcess
from distributed_ebm.recipes.attack import run_attack


def test_attack_progress_counts_broken_images_across_batches(tmp_path, capsys):
    cfg = load_config(AttackConfig, None, ["attack.mode=pgd", "data.count=4", "batch_size=2", "attack.steps=3",
                                           "attack.eps=0.5", "attack.step_size=0.2", f"output={tmp_path}",
                                           "mlflow.enabled=false"])
    summary = run_attack(cfg, OneProcess())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[attack:pgd]")]
    broken = summary["images"] - round(summary["robust_accuracy"] * summary["images"])
    assert broken == 4 and lines[-1].startswith("[attack:pgd] 4/4 (100.0%)") and lines[-1].endswith(f"broken={broken}")
