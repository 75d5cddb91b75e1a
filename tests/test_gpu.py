"""CUDA against the CPU: the defended attack modes, the defense's reduction, a training step and
the NCCL collectives. Skipped without CUDA; run with `pytest -m gpu` on a machine with a GPU
(DEBM_SHARED must point at the test images and the ResNet-20 weights)."""
import copy

import pytest
import torch

from distributed_ebm.config import AttackSettings, TrainEBMConfig, load_config
from distributed_ebm.local.train import LocalTraining
from distributed_ebm.method.attacks import Attack
from distributed_ebm.method.defense import EOTDefense, Purifier
from distributed_ebm.store.data import ImageSet, subset

from .conftest import tiny_ebm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _fields(records):
    return [(r.index, r.label, r.natural_protocol_pred, r.natural_defense_pred, r.broken_at, r.final_pred,
             r.image_steps, r.reeval_correct) for r in records]


@pytest.mark.parametrize("mode", ["bpda_eot", "exact_eot", "transfer", "defense", "pgd"])
def test_attack_modes_on_cuda_equal_the_cpu(exact_test, resnet20, mode):
    """Float64, so no decision sits within rounding of its threshold: the records must be equal."""
    data = subset(exact_test, count=6)
    clf, ebm = copy.deepcopy(resnet20).double(), tiny_ebm(scale=20).double()
    settings = AttackSettings(mode=mode, steps=3, eot_attack=3, eot_defense=4,
                              reevaluations=0 if mode == "pgd" else 2)
    out = {}
    for device in ("cpu", CUDA):
        purifier = Purifier(copy.deepcopy(ebm).to(device), steps=2, step_size=1.0, noise=0.05)
        attack = Attack(clf.to(device), purifier, settings, seed=3, chunk_size=5)
        # labels and ids as the CPU hands them over: the engine moves them (the crash this guards against)
        out[str(device)] = attack(data.floats().double().to(device), data.labels, data.ids)
    cpu, cuda = out["cpu"], out[str(CUDA)]
    assert _fields(cuda) == _fields(cpu)
    for a, b in zip(cuda, cpu):
        assert abs(a.adv_image - b.adv_image).max() < 1e-9


def test_defense_reduction_is_deterministic_on_cuda(exact_test, resnet20):
    """Same sums bit for bit across runs and chunkings (the former index_add_ used atomics)."""
    x, y, ids = exact_test.floats()[:8].to(CUDA), exact_test.labels[:8].to(CUDA), exact_test.ids[:8].to(CUDA)
    purifier = Purifier(tiny_ebm(scale=20).to(CUDA), steps=2, step_size=1.0, noise=0.05)
    runs = []
    for chunk in (64, 64, 37):
        d = EOTDefense(resnet20.to(CUDA), purifier, chunk_size=chunk)
        runs.append((d.logits(x, ids, seed=0, call=0, replicates=150),
                     d.logits_and_grad(x, y, ids, seed=0, call=1, replicates=150)[1]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.allclose(runs[0][0], runs[2][0], atol=1e-5)  # other chunks: other conv batch sizes


def test_training_step_on_cuda_equals_the_cpu(exact_test):
    data = subset(exact_test, count=16)
    data = ImageSet(data.floats(), data.labels, data.ids)
    cfg = load_config(TrainEBMConfig, None, ["ebm.width=8", "langevin.steps=5", "batch_size=8", "bank_init=data"])
    runs = {device: LocalTraining(cfg, data, device=device) for device in ("cpu", "cuda")}
    metrics = {device: run.step() for device, run in runs.items()}
    for k in ("energy_diff", "energy_pos", "energy_neg", "loss", "grad_norm"):
        assert metrics["cuda"][k] == pytest.approx(metrics["cpu"][k], rel=1e-3, abs=1e-6), k
    # Adam's first moment after one step is (1 - beta1) * gradient: the gradients agree
    m_cpu = [s["exp_avg"] for s in runs["cpu"].optimizer.state_dict()["state"].values()]
    m_cuda = [s["exp_avg"].cpu() for s in runs["cuda"].optimizer.state_dict()["state"].values()]
    for a, b in zip(m_cpu, m_cuda):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6 * a.abs().max().item())
    assert torch.allclose(runs["cpu"].bank.states, runs["cuda"].bank.states, atol=1e-4)  # the chains after K steps


def test_collectives_run_on_nccl(tmp_path):
    """NCCL refuses CPU tensors: the helpers put them on the worker's device."""
    import torch.distributed as dist

    from distributed_ebm.distributed.ray_train import all_reduce, barrier, collective_device

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert collective_device("cuda:0") == torch.device("cuda", 0)
        assert all_reduce([1.5, 2.0], "cuda:0") == [1.5, 2.0]
        assert all_reduce([1.0], "cuda:0", dist.ReduceOp.MIN) == [1.0]
        barrier(2, "cuda:0")  # world > 1 takes the collective path; this group has one rank
    finally:
        dist.destroy_process_group()
