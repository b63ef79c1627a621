"""Process-group plumbing for `torchrun` (DDP): gloo on CPU, nccl on GPU; a no-op for one process.

Only rank 0 writes files; every collective here is called by every rank in the same order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config import TrainError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device_flag: str, threads: int) -> DistEnv:
    """Read torchrun's environment, pick the device, join the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda but no CUDA device is present")
    cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(rank, world, local_rank, device)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor on t's device; float64 sums stay exact for counts)."""
    if not env.distributed:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather(t: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on every rank), on the CPU, in rank order."""
    if not env.distributed:
        return [t.cpu()]
    src = t.to(env.device)
    out = [torch.empty_like(src) for _ in range(env.world)]
    dist.all_gather(out, src)
    return [x.cpu() for x in out]


def broadcast_flag(value: bool, env: DistEnv) -> bool:
    """Rank 0's decision (e.g. early stopping), for everyone."""
    if not env.distributed:
        return value
    t = torch.tensor([1 if value else 0], device=env.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
