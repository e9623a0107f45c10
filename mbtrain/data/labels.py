"""The task columns and the --weight-column read into tensors: each task's type (tasks/) parses its column, a
missing label is NaN where --missing-labels skip allows one, and every failure is one line naming file and column."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch

from mbtrain.data.coded import CodedFrame, chunk_views
from mbtrain.errors import MbtrainError
from mbtrain.tasks import TASK_TYPES, infer_type
from mbtrain.tasks.binary import FALSE_TEXT, TRUE_TEXT


@dataclass
class LabelColumns:
    """What to read as labels: the tasks in output order, each one's type, what a missing label means, the column
    of row weights (or None), and what each type needs to read its column (a multiclass task's classes)."""

    names: list[str]
    types: list[str]
    missing: str = "error"
    weight: str | None = None
    states: list[dict[str, Any]] = field(default_factory=list)  # per task, TaskType.read_state's; empty: none

    @property
    def columns(self) -> list[str]:
        """The file columns these read."""
        return self.names + ([self.weight] if self.weight else [])

    def read(self, frame: pl.DataFrame | CodedFrame, source: str) -> torch.Tensor:
        """float32 [rows, T] in the columns' own units, NaN where a row has no label (--missing-labels skip)."""
        table = _table(frame)
        labels = torch.empty(table.height, len(self.names))
        for j, (name, kind) in enumerate(zip(self.names, self.types, strict=True)):
            if name not in table.columns:
                listed = ", ".join(frame.columns[:12]) + (f", … ({len(frame.columns)} in all)"
                                                          if len(frame.columns) > 12 else "")
                raise MbtrainError(f"{source}: task column {name!r} not found; columns are {listed}")
            column = table.get_column(name)
            if column.dtype.is_float():  # NaN is a missing label, like null, for every type
                column = column.fill_nan(None)
            values = TASK_TYPES[kind].read(column, source, self.states[j] if self.states else {})
            nulls = values.null_count()
            if nulls and self.missing == "error":
                raise MbtrainError(f"{source}: label column {name!r} has {nulls:,} missing value(s); pass "
                                   "--missing-labels skip to train each task on the rows that have its label")
            for start, part in chunk_views(values.fill_null(float("nan"))):
                labels[start : start + len(part), j] = part
        return labels

    def weights(self, frame: pl.DataFrame | CodedFrame, source: str) -> torch.Tensor | None:
        """float32 [rows] --weight-column's values (finite, ≥ 0, none missing), or None without one."""
        if self.weight is None:
            return None
        table = _table(frame)
        if self.weight not in table.columns:
            raise MbtrainError(f"{source}: --weight-column {self.weight!r} not found")
        column = table.get_column(self.weight)
        if not column.dtype.is_numeric():
            raise MbtrainError(f"{source}: --weight-column {self.weight!r} holds {column.dtype}; weights are numbers")
        values = column.cast(pl.Float64)
        missing = values.null_count() + int(values.is_nan().sum())
        if missing:
            raise MbtrainError(f"{source}: --weight-column {self.weight!r} has {missing:,} missing value(s); every row "
                               "needs a weight")
        bad = values.filter((values < 0) | values.is_infinite())
        if bad.len():
            raise MbtrainError(f"{source}: --weight-column {self.weight!r} holds {bad[0]:g}; weights must be finite "
                               "and non-negative")
        return torch.from_numpy(values.cast(pl.Float32).to_numpy().copy())


def label_types(frame: pl.DataFrame | pl.LazyFrame | CodedFrame, source: str, tasks: list[str],
                given: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{task: (type, reason)} in `tasks` order: --task-type's, else inferred from the column (tasks.infer_type) in
    one pass over the label columns (the streaming engine's, for a LazyFrame)."""
    table = _table(frame) if isinstance(frame, CodedFrame) else frame
    schema = table.collect_schema() if isinstance(table, pl.LazyFrame) else table.schema
    inferred = [task for task in tasks if task not in given]
    for task in tasks:
        if task not in schema:
            raise MbtrainError(f"{source}: task column {task!r} not found")
    query = [_zero_one(task, schema[task]).alias(task) for task in inferred]
    zero_one = {}
    if query:
        selected = table.select(query)
        zero_one = (selected.collect(engine="streaming") if isinstance(selected, pl.LazyFrame) else selected).row(
            0, named=True)
    return {task: (given[task], "--task-type") if task in given
            else infer_type(task, schema[task], bool(zero_one[task]), source) for task in tasks}


def read_states(frame: pl.DataFrame | pl.LazyFrame | CodedFrame, source: str, types: dict[str, str]
                ) -> list[dict[str, Any]]:
    """Per task (in `types` order), what its type needs to read the column: a class type's classes from the
    column's distinct values and counts over `frame`, one pass per such task; {} for the others."""
    table = _table(frame) if isinstance(frame, CodedFrame) else frame
    states = []
    for task, kind in types.items():
        if not TASK_TYPES[kind].reads_classes:
            states.append({})
            continue
        counted = table.select(pl.col(task).drop_nulls().value_counts(name="count")).unnest(task)
        counted = counted.collect(engine="streaming") if isinstance(counted, pl.LazyFrame) else counted
        states.append(TASK_TYPES[kind].read_state(task, counted.get_column(task), counted.get_column("count"), source))
    return states


def _zero_one(name: str, dtype: pl.DataType) -> pl.Expr:
    """Whether the column has a value and every value present (NaN is missing) is 0/1 (numbers) or 0/1/true/false
    (text)."""
    column = (pl.col(name).fill_nan(None) if dtype.is_float() else pl.col(name)).drop_nulls()
    if dtype.is_numeric():
        return ((column == 0) | (column == 1)).all() & (column.len() > 0)
    if dtype == pl.String:
        return column.str.strip_chars().str.to_lowercase().is_in(sorted(TRUE_TEXT | FALSE_TEXT)).all() & (
            column.len() > 0)
    return pl.lit(False)


def _table(frame: pl.DataFrame | CodedFrame) -> pl.DataFrame:
    """A CodedFrame holds its labels as read (read_coded's `plain`)."""
    return frame.frame if isinstance(frame, CodedFrame) else frame
