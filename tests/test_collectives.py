"""The training workers' collectives: the tensor lives where the process group's backend reduces
(NCCL: the worker's CUDA device; gloo: the CPU). The NCCL path itself runs in tests/test_gpu.py."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_ebm.distributed.ray_train import all_workers, barrier, collective_device, mean_over_workers


def test_collective_device_follows_the_backend():
    assert collective_device(torch.device("cuda", 3), "nccl") == torch.device("cuda", 3)
    assert collective_device("cuda:1", "nccl") == torch.device("cuda", 1)
    assert collective_device("cuda:1", "gloo") == torch.device("cpu")
    assert collective_device("cpu", "gloo") == torch.device("cpu")
    with pytest.raises(ValueError, match="nccl backend reduces CUDA tensors"):
        collective_device("cpu", "nccl")


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        assert collective_device("cpu") == torch.device("cpu")  # from dist.get_backend()
        agree = all_workers(world, "cpu")
        both = agree(True)
        one = agree(rank == 0)
        means = mean_over_workers([float(rank), 10.0 * rank + 1], world, "cpu")
        barrier(world, "cpu")
        torch.save({"both": both, "one": one, "means": means}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_agree_and_mean_over_two_gloo_workers(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=True)
        assert r == {"both": True, "one": False, "means": [0.5, 6.0]}
