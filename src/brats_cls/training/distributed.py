"""DistributedDataParallel under ``torchrun``: joining the process group and summing across ranks."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, ...), if any."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    uses_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if uses_cuda:
        torch.cuda.set_device(local_rank)
    # Long timeout: rank 0 may be preprocessing the whole data set while the others wait.
    dist.init_process_group("nccl" if uses_cuda else "gloo", timeout=datetime.timedelta(hours=4))
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def all_reduce(values: list[float], device: torch.device, ddp: Distributed) -> list[float]:
    """The sum of ``values`` over every rank (the values themselves when not distributed)."""
    if not ddp.active:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
