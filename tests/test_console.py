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


def test_the_driver_prints_what_the_workers_board_holds_and_each_restart(capsys):
    """A Ray Train run's progress without Ray: rank 0 reports to a board, the driver follows it."""
    import threading

    from distributed_ebm.progress import ProgressBoard, Reporter, follow

    board = ProgressBoard()
    quiet = Reporter(4, "train-ebm:two", start=1)  # another rank: counts, posts nothing
    quiet.update(3)
    assert quiet.done == 4 and board.read() == (None, [])
    rank0 = Reporter(4, "train-ebm:two", start=1, post=board.post, started=board.started)
    rank0.update(1, energy_diff=0.25)
    board.started(2)  # the workers started again after a loss
    rank0.update(2, energy_diff=0.5)
    stop = threading.Event()
    stop.set()  # one look, then stop
    follow(board.read, stop, every=0)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("train-ebm:two: lost a worker or a bank shard; Ray Train restarted the run from its last "
                      "checkpoint (2 of 4 done; restart 1)")
    assert err[-1].startswith("[train-ebm:two] 4/4 (100.0%)") and err[-1].endswith("energy_diff=0.5")
