"""Where training runs: the device, and under torchrun the process group (gloo on CPU, NCCL on GPU).

mbtrain does not wrap the model in DistributedDataParallel: MetaBalance needs each task's gradient of the
shared parameters summed over ranks *before* it takes their norms, which DDP's backward hooks cannot give.
Instead every rank computes its losses as (sum over its rows) / (rows in the global batch), and the
balancer sums gradients across ranks where it needs them (`Cluster.sum_`), so N ranks with batch B take
exactly the step one process takes with batch N·B.

Work that every rank needs done once (the streamed path's schema and encoder fit, validation) runs on rank 0
and reaches the others through `from_main`, on a gloo group of its own whose timeout allows rank 0 a long
pass over the data: the training collectives keep the backend's default timeout (NCCL's is 10 minutes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mbtrain.errors import MbtrainError

DEVICES = ("auto", "cpu", "cuda")
HANDOFF_TIMEOUT = timedelta(hours=6)  # how long ranks wait for rank 0's pass over the data (see from_main)
T = TypeVar("T")
_handoff_group: Any = None  # the gloo group from_main waits on; made with the process group, gone with it


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

    def gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each of `tensors` as every rank holds it, in rank order; the tensors share their first size on a
        rank, which may differ between ranks. Two collectives whatever the number of tensors: the sizes, then
        every tensor's rows as bytes side by side in one all_gather (on gloo a collective costs about a
        millisecond however small: an embedding table's rows and their gradients travel together)."""
        if self.world_size == 1:
            return [[tensor] for tensor in tensors]
        size = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        rows = [t.reshape(t.shape[0], math.prod(t.shape[1:])) for t in tensors]  # a rank may hold no rows
        widths = [r.shape[1] * r.element_size() for r in rows]
        packed = tensors[0].new_zeros(max(counts), sum(widths), dtype=torch.uint8)
        packed[: counts[self.rank]] = torch.cat([r.contiguous().view(torch.uint8) for r in rows], dim=1)
        parts = [torch.empty_like(packed) for _ in range(self.world_size)]
        dist.all_gather(parts, packed)
        gathered: list[list[torch.Tensor]] = [[] for _ in tensors]
        for part, count in zip(parts, counts, strict=True):
            for found, tensor, piece in zip(gathered, tensors, part[:count].split(widths, dim=1), strict=True):
                # copied into strides of its own: .contiguous() keeps a 0- or 1-row slice's, which view() refuses
                own = torch.empty(piece.shape, dtype=torch.uint8, device=piece.device).copy_(piece)
                found.append(own.view(tensor.dtype).reshape(count, *tensor.shape[1:]))
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the process group; after a failure, without waiting for ranks that may never arrive."""
        global _handoff_group
        if self.world_size > 1 and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
            _handoff_group = None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in DEVICES:
        raise MbtrainError(f"--device {name!r} is not supported: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise MbtrainError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def cluster_from_env(device: str) -> Cluster:
    """One process, or the rank torchrun started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    On one machine the process group's keys carry torchrun's attempt (TORCHELASTIC_RESTART_COUNT): torchrun's agent
    keeps one store across the restarts of --max-restarts, and a restarted group looking up the same key names
    would find the dead attempt's addresses there and fail to connect, or wait on each other
    (pytorch/pytorch#135712). Each machine's agent counts its own attempts (one whose workers lived restarts
    without counting), so on several machines the keys stay as they are, and torchrun needs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a fresh store each attempt (docs/scaling.md)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    where = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
        store, _, _ = next(dist.rendezvous("env://", rank, world_size))  # the store env:// init would use
        if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":  # one machine: every rank counts the same attempts
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                store=store)
        global _handoff_group
        _handoff_group = dist.new_group(backend="gloo", timeout=HANDOFF_TIMEOUT)
    return Cluster(rank, world_size, where)


def ranks_on_this_node() -> int:
    """Ranks sharing this machine's memory: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on some rank (through the hand-off group); in one process, `flag` itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_handoff_group)
    return bool(value)


def every_rank(value: T) -> list[T]:
    """`value` as every rank holds it, in rank order (pickled, through the hand-off group, whatever the training
    backend); in one process, [value]."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_handoff_group)
    return values


def main_says(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (through the hand-off group): a decision rank 0's clock alone makes."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.broadcast(value, src=0, group=_handoff_group)
    return bool(value)


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 alone and its result handed to every rank (pickled); in one process, just
    `compute()`. An MbtrainError on rank 0 is raised on every rank, so that none waits for a result that will
    not come; any other failure on rank 0 closes its process group, which fails the others' wait."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, compute())
        except MbtrainError as exc:
            box[0] = (False, str(exc))
            dist.broadcast_object_list(box, src=0, group=_handoff_group)
            raise
    dist.broadcast_object_list(box, src=0, group=_handoff_group)
    done, value = box[0]
    if not done:
        raise MbtrainError(value)
    return value
