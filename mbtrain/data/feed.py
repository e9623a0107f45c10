"""The training batches on the training device: `Rows.batches`, the same batches in the same order, with their
tensors already where the step reads them.

Copying each batch to the GPU synchronously at the top of the step leaves the GPU idle while the host
gathers and copies rows. Which way a fit feeds its device is decided once (`DeviceFeed`'s `mode`):
- `direct`: the batches as `Rows.batches` cuts them, each copied synchronously (the CPU's choice, where
  nothing is copied at all);
- `resident`: the training rows' tensors (only this set's `rows`) copied to the device once, at the first
  epoch, and kept; each batch is cut there with index_select, from the same row order that `row_order` draws
  on the host (the order copied once per epoch). The GPU's choice for data in memory that fits
  RESIDENT_SHARE of its free memory;
- `prefetch`: each batch assembled on the host, pinned, and copied with non_blocking=True one batch ahead: the
  next batch's copy is issued before the current one is handed to the step. The GPU's choice for streamed
  data or data too big to keep there.
Every mode runs on the CPU too (no pinning there), so that the tests check them all against `Rows.batches`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mbtrain.data.batches import EncodedData, Rows, row_order
from mbtrain.errors import MbtrainError

MODES = ("direct", "resident", "prefetch")
RESIDENT_SHARE = 0.25  # of the GPU's free memory that the training rows may take to stay there


class DeviceFeed:
    """One fit's training rows as batches on `device`: made once per fit, so resident tensors last its epochs."""

    def __init__(self, rows: Rows, device: torch.device, mode: str | None = None) -> None:
        self.rows, self.device = rows, device
        self.mode = mode or auto_mode(rows, device)
        if self.mode not in MODES:
            raise MbtrainError(f"feed mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "resident" and not isinstance(rows, EncodedData):
            raise MbtrainError("feed mode 'resident' needs the training rows in memory, not streamed")
        self.resident: EncodedData | None = None  # the rows on the device, from the first resident epoch on

    def batches(self, batch_size: int, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[EncodedData, int]]:
        """`Rows.batches`' (this rank's batch, rows in the global batch), the batch's tensors on the device."""
        if self.mode == "resident":
            return self._resident_batches(batch_size, generator, rank, world_size)
        batches = self.rows.batches(batch_size, generator, rank, world_size)
        if self.mode == "prefetch":
            return self._prefetched(batches)
        if self.device.type == "cpu":
            return batches
        return ((_moved(batch, self.device), rows) for batch, rows in batches)

    def _resident_batches(self, batch_size: int, generator: torch.Generator | None, rank: int,
                          world_size: int) -> Iterator[tuple[EncodedData, int]]:
        """EncodedData.batches, cut from the device's copy."""
        if self.resident is None:
            self.resident = _compact(self.rows, self.device)  # type: ignore[arg-type]  # __init__ checked it
        data, rows = self.resident, len(self.resident)
        order = row_order(rows, generator).to(self.device)
        step = batch_size * world_size
        for start in range(0, rows, step):
            chunk = order[start : start + step]
            index = chunk[rank * batch_size : (rank + 1) * batch_size]
            yield data.map(lambda tensor: tensor.index_select(0, index)), chunk.numel()  # noqa: B023

    def _prefetched(self, batches: Iterator[tuple[EncodedData, int]]) -> Iterator[tuple[EncodedData, int]]:
        """Batch k + 1's copy issued before batch k is handed out. A pinned host batch is held until the step has
        taken its copy (and PyTorch's pinned-memory cache reuses a block only once its copies have ended)."""
        pin = self.device.type == "cuda"
        pending = None  # (host batch, its device copy, rows in the global batch): the copy may still run
        for batch, global_rows in batches:
            host = batch.map(torch.Tensor.pin_memory) if pin else batch
            staged = (host, _moved(host, self.device, non_blocking=True), global_rows)
            if pending is not None:
                yield pending[1], pending[2]
            pending = staged
        if pending is not None:
            yield pending[1], pending[2]


def auto_mode(rows: Rows, device: torch.device) -> str:
    """`direct` off CUDA; on CUDA `resident` for rows in memory within RESIDENT_SHARE of the free memory, else
    `prefetch`."""
    if device.type != "cuda":
        return "direct"
    if isinstance(rows, EncodedData) and _bytes(rows) <= RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]:
        return "resident"
    return "prefetch"


def _bytes(data: EncodedData) -> int:
    """What the set's rows take once compact."""
    tensors = [data.categorical, data.numeric, data.labels] + ([data.weights] if data.weights is not None else [])
    return len(data) * sum(t[:1].numel() * t.element_size() for t in tensors)


def _compact(data: EncodedData, device: torch.device) -> EncodedData:
    """The set's own rows on the device, one tensor at a time (the host holds one compact copy at most)."""
    rows = data.rows
    return data.map(lambda tensor: (tensor if rows is None else tensor[rows]).to(device))


def _moved(batch: EncodedData, device: torch.device, non_blocking: bool = False) -> EncodedData:
    return batch.map(lambda tensor: tensor.to(device, non_blocking=non_blocking))
