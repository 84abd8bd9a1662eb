"""Data-parallel bookkeeping (torchrun): which rank this is, and the few collectives the loop needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return DistInfo()


def collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sums(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, dist: DistInfo) -> tuple[float, int, int]:
    """Loss sum, correct count and images seen, summed over all ranks (an all-reduce under DDP)."""
    if dist.world == 1:
        return float(loss_sum), int(correct), seen
    totals = torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64,
                          device=collective_device())
    torch.distributed.all_reduce(totals)
    return float(totals[0]), int(totals[1]), int(totals[2])


def max_over_ranks(value: int, dist: DistInfo) -> int:
    """The largest of every rank's ``value`` (a stop request may reach only some processes)."""
    if dist.world == 1:
        return value
    t = torch.tensor(int(value), device=collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def barrier(dist: DistInfo) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def gather_rng_states(dist: DistInfo) -> list[torch.Tensor]:
    """Every rank's CPU RNG state (its dropout and augmentation stream), in rank order."""
    if dist.world == 1:
        return [torch.get_rng_state()]
    states = [None] * dist.world
    torch.distributed.all_gather_object(states, torch.get_rng_state())
    return states
