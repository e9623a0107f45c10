"""Encoded tensors and the mini-batches cut from them: a shuffled index over in-memory tensors; and `Rows`,
the one interface the fit loop reads data through, in memory (EncodedData) or streamed (StreamingBatches)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from mbtrain.tasks import LabelSums

SCORE_ROWS = 65_536  # rows per chunk when a whole set is scored


class Rows(Protocol):
    """A training or validation set as the fit loop sees it."""

    streamed: bool  # read from disk as the epoch goes (so a step can fail on bad data), not held in memory

    def __len__(self) -> int: ...

    def label_sums(self) -> LabelSums:
        """Per task, the sums of its labels over the rows that have one: what the task types fit from."""
        ...

    def steps(self, batch_size: int, world_size: int = 1) -> int:
        """Steps per epoch: global batches of world_size × batch_size rows."""
        ...

    def batches(self, batch_size: int, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[EncodedData, int]]:
        """(this rank's batch, rows in the global batch) for each of the epoch's steps."""
        ...

    def chunks(self) -> Iterator[EncodedData]:
        """Every row once, in order, in chunks (with group keys where the set has them): what scoring reads."""
        ...


@dataclass
class EncodedData:
    """Encoded rows; `rows` (when set) says which rows of the tensors belong to this set, so that the
    training rows of a file need no copy of their own."""

    categorical: torch.Tensor  # int64 [N, C]: vocabulary indices, 0 = unknown
    numeric: torch.Tensor  # float32 [N, C]: raw values, NaN = null
    labels: torch.Tensor  # float32 [N, T], main task first, in the columns' own units; NaN: no label
    rows: torch.Tensor | None = None
    groups: torch.Tensor | None = None  # int64 [N]: --group-by keys (schema.group_keys), validation sets only
    weights: torch.Tensor | None = None  # float32 [N]: --weight-column's
    streamed: ClassVar[bool] = False

    def __len__(self) -> int:
        return self.categorical.shape[0] if self.rows is None else self.rows.numel()

    def label_sums(self) -> LabelSums:
        if self.rows is None:
            return LabelSums.of(self.labels, self.weights)
        return LabelSums.of(self.labels[self.rows], None if self.weights is None else self.weights[self.rows])

    def map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> EncodedData:
        """`change` applied to each per-row tensor (a slice, an index, a copy to the device); `rows` is not kept,
        so `change` must select the set's own rows itself."""
        return EncodedData(change(self.categorical), change(self.numeric), change(self.labels),
                           groups=None if self.groups is None else change(self.groups),
                           weights=None if self.weights is None else change(self.weights))

    def take(self, index: torch.Tensor) -> EncodedData:
        """A compact copy of the set's rows at positions `index` (0 ≤ index < len(self))."""
        if self.rows is not None:
            index = self.rows[index]
        return self.map(lambda tensor: tensor[index])

    def chunks(self) -> Iterator[EncodedData]:
        for start in range(0, len(self), SCORE_ROWS):
            end = min(start + SCORE_ROWS, len(self))
            if self.rows is not None:
                yield self.take(torch.arange(start, end))
                continue
            yield self.map(lambda tensor: tensor[start:end])  # noqa: B023  (called at once)

    def steps(self, batch_size: int, world_size: int = 1) -> int:
        """Steps per epoch: global batches of world_size × batch_size rows."""
        return -(-len(self) // (batch_size * world_size))

    def batches(self, batch_size: int, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[EncodedData, int]]:
        """(this rank's slice, rows in the global batch) for each global batch of world_size × batch_size rows,
        in the shuffled order that `generator` draws (the same on every rank), or in row order without one."""
        rows = len(self)
        order = row_order(rows, generator)
        step = batch_size * world_size
        for start in range(0, rows, step):
            chunk = order[start : start + step]
            yield self.take(chunk[rank * batch_size : (rank + 1) * batch_size]), chunk.numel()


def row_order(rows: int, generator: torch.Generator | None) -> torch.Tensor:
    """The order to take `rows` rows in: the permutation `generator` draws, or row order without one."""
    return torch.randperm(rows, generator=generator) if generator is not None else torch.arange(rows)


def split_rows(rows: int, valid_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random (train, valid) row indices, each sorted; valid gets at least one row. numpy draws the
    held-out rows without permuting them all, faster than a full torch.randperm (docs/benchmarks.md)."""
    held = np.zeros(rows, dtype=bool)
    count = min(max(1, round(rows * valid_fraction)), rows - 1)
    held[np.random.default_rng(seed).choice(rows, count, replace=False, shuffle=False)] = True
    return torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))  # sorted, no sort
