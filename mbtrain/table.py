"""An embedding table's gradient: the rows a batch touched and their summed gradients, never the whole table.

One representation for every path: the table's ``.grad`` is a sparse COO tensor of the table's shape, what
``nn.Embedding(sparse=True)`` gives the plain backward and what the per-task balancers set from their per-row
combinations (`add_rows`). `touched` reads it as (distinct rows in ascending order, their summed gradients);
under torchrun `sum_across_ranks` gathers every rank's touched rows and coalesces them in one order on every
rank, so the exchange grows with the batch, not with the table; the table optimizers (optim.py) step those rows
only, or, dense Adam, the whole table. So a step's cost follows the batch whatever the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from mbtrain.balance.base import Gather

BITMAP_ROWS = 32  # see distinct_rows


def sparse_table(rows: int, dim: int) -> nn.Embedding:
    """An embedding whose weight's gradient is the touched rows, marked so that every rank sums it as rows."""
    embedding = nn.Embedding(rows, dim, sparse=True)
    embedding.weight.is_table = True
    return embedding


def is_table(param: torch.Tensor) -> bool:
    """Whether `param` is an embedding table whose gradient is touched rows (sparse_table's mark): by the mark
    alone, never by the gradient at hand, so that every rank takes the same collectives."""
    return getattr(param, "is_table", False)


def rows_gradient(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The table's gradient holding `values` [R, dim] at the distinct, ascending `rows` [R]."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, table.shape, is_coalesced=True,
                                   check_invariants=False)


def no_rows(table: torch.Tensor) -> torch.Tensor:
    """The gradient of a table no row of which was touched (a rank's empty batch, a task that does not reach it)."""
    return rows_gradient(table, table.new_zeros(0, dtype=torch.long), table.new_zeros(0, *table.shape[1:]))


def add_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``table.grad += values`` at the distinct, ascending `rows`, like autograd's accumulation."""
    grad = rows_gradient(table, rows, values)
    table.grad = grad if table.grad is None else table.grad + grad


def touched(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct rows in ascending order [R], their summed gradients [R, dim]) of a table's gradient. A dense
    gradient (DB-MTL's, whose moving averages reach every row they have seen) touches every row. Duplicates are
    summed with distinct_rows and one accumulating index_put: a few times cheaper than torch's coalesce on the CPU
    (docs/benchmarks.md)."""
    if not grad.is_sparse:
        return torch.arange(grad.shape[0], device=grad.device), grad
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    return coalesced(grad._indices()[0], grad._values(), grad.shape[0])


def coalesced(index: torch.Tensor, values: torch.Tensor, table_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct rows of `index` in ascending order, `values` [len(index), ...] summed onto them)."""
    rows, inverse = distinct_rows(index, table_rows)
    return rows, values.new_zeros(rows.numel(), *values.shape[1:]).index_put_((inverse,), values, accumulate=True)


def gathered_rows(rows: torch.Tensor, values: torch.Tensor, gather: Gather, table_rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's distinct `rows` and their `values` summed with every rank's: gathered, then added rank by rank.
    A rank's rows are distinct, so no index_add adds twice into one row and every rank sums in the same order,
    even where index_add is not deterministic (CUDA): the ranks stay equal."""
    every_rows, every_values = gather([rows, values])
    rows, inverse = distinct_rows(torch.cat(every_rows), table_rows)
    summed = values.new_zeros(rows.numel(), *values.shape[1:])
    for at, part in zip(inverse.split([r.numel() for r in every_rows]), every_values, strict=True):
        summed.index_add_(0, at, part)
    return rows, summed


def distinct_rows(index: torch.Tensor, table_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(index, return_inverse=True): the distinct rows in ascending order and each entry's position
    among them. Up to BITMAP_ROWS table rows per entry, marking the rows in a table-sized mask beats sorting the
    entries (docs/benchmarks.md, "Measurements behind design choices"); the mask stays batch-sized."""
    if table_rows > BITMAP_ROWS * index.numel():
        return torch.unique(index, return_inverse=True)
    seen = torch.zeros(table_rows, dtype=torch.bool, device=index.device)
    seen[index] = True
    rows = seen.nonzero().squeeze(1)
    position = torch.empty(table_rows, dtype=torch.long, device=index.device)
    position[rows] = torch.arange(rows.numel(), device=index.device)
    return rows, position[index]


def sum_across_ranks(tables: Sequence[torch.Tensor], gather: Gather) -> None:
    """Each table's gradient summed across ranks as touched rows (summed_rows); a rank whose batch reached no
    row adds none."""
    for table in tables:
        table.grad = summed_rows(table.grad if table.grad is not None else no_rows(table), gather)


def summed_rows(grad: torch.Tensor, gather: Gather) -> torch.Tensor:
    """A table's gradient summed across ranks as its touched rows (gathered_rows): the exchange grows with the
    batch, not with the table."""
    return rows_gradient(grad, *gathered_rows(*touched(grad), gather, grad.shape[0]))


def dense_of(tables: Iterable[torch.Tensor]) -> None:
    """Each table's gradient made dense in place (dense Adam's whole-table step reads it so)."""
    for table in tables:
        if table.grad is not None and table.grad.is_sparse:
            table.grad = table.grad.to_dense()
