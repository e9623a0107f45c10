"""Where training runs: the device, and under torchrun the process group (gloo on CPU, NCCL on GPU).

mbtrain does not wrap the model in DistributedDataParallel: MetaBalance needs each task's gradient of the
shared parameters summed over ranks *before* it takes their norms, which DDP's backward hooks cannot give.
Instead every rank computes its losses as (sum over its rows) / (rows in the global batch), and the
balancer sums gradients across ranks where it needs them (`Cluster.sum_`), so N ranks with batch B take
exactly the step one process takes with batch N·B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mbtrain.errors import MbtrainError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Cluster:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files and prints."""
        return self.rank == 0

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` in place across ranks, as one flat all-reduce."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(part.view_as(tensor))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the process group; after a failure, without waiting for ranks that may never arrive."""
        if self.world_size > 1 and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in DEVICES:
        raise MbtrainError(f"--device {name!r} is not supported: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise MbtrainError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def cluster_from_env(device: str) -> Cluster:
    """One process, or the rank torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    where = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Cluster(rank, world_size, where)
