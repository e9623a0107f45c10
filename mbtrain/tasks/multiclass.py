"""Multi-class tasks (a rating of 1-5, a reaction among several, a category bought): softmax cross-entropy over the
column's classes, one output column per class.

The classes are the column's distinct values over the training data (text or integers), at most MAX_CLASSES of
them: a column with more is one clear error (a regression task or an id column, more likely). They are saved in the
run; a value outside them where the run reads labels (validation, eval) is one clear error too. Predictions are each
class's probability; `predict` adds the most likely class.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from mbtrain.errors import MbtrainError
from mbtrain.metrics import multiclass_metrics
from mbtrain.tasks.base import LabelSums, TaskType, register

MAX_CLASSES = 1000


class Softmax(nn.Module):
    """Each multiclass task's class probabilities, over its own logit columns."""

    def __init__(self, tasks: list[TaskType], columns: list[int]) -> None:
        super().__init__()
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.bounds: list[int] = [sum(t.width for t in tasks[:i]) for i in range(len(tasks) + 1)]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        mine = logits.index_select(1, self.columns)
        parts: list[torch.Tensor] = []
        for i in range(len(self.bounds) - 1):
            parts.append(torch.softmax(mine[:, self.bounds[i] : self.bounds[i + 1]], dim=1))
        return torch.cat(parts, dim=1)


@register("multiclass")
class Multiclass(TaskType):
    reads_classes = True
    directions = {"accuracy": True, "macro_auc": True, "logloss": False}
    monitor = "accuracy"
    table = {"accuracy": "accuracy", "macro_auc": "macro AUC", "logloss": "log loss"}

    @classmethod
    def read_state(cls, task: str, values: pl.Series, counts: pl.Series, source: str) -> dict[str, Any]:
        if values.len() > MAX_CLASSES:
            raise MbtrainError(f"{source}: multiclass task {task!r} has {values.len():,} classes; it takes at most "
                               f"{MAX_CLASSES:,} (a regression task, or an id column, is more likely)")
        if values.len() < 2:
            raise MbtrainError(f"{source}: multiclass task {task!r} has {values.len()} class(es); it needs two or more")
        if not (values.dtype.is_integer() or values.dtype in (pl.String, pl.Categorical, pl.Enum)
                or isinstance(values.dtype, pl.Categorical | pl.Enum)):
            raise MbtrainError(f"{source}: multiclass task {task!r} holds {values.dtype}; classes are text or "
                               "integers")
        if not values.dtype.is_integer():
            values = values.cast(pl.String)
        order = values.arg_sort()
        total = float(counts.sum())
        return {"classes": values.gather(order).to_list(),
                "shares": [float(count) / total for count in counts.gather(order).to_list()]}

    @classmethod
    def read(cls, column: pl.Series, source: str, state: dict[str, Any]) -> pl.Series:
        classes = state["classes"]
        kind = pl.String if isinstance(classes[0], str) else pl.Int64
        try:
            values = column.cast(kind)
        except pl.exceptions.InvalidOperationError:
            raise MbtrainError(f"{source}: label column {column.name!r} holds {column.dtype}; its classes are "
                               f"{kind}") from None
        index = pl.DataFrame({"value": values}).join(
            pl.DataFrame({"value": pl.Series(classes, dtype=kind), "index": range(len(classes))}),
            on="value", how="left", maintain_order="left")
        unknown = index.filter(pl.col("value").is_not_null() & pl.col("index").is_null())
        if unknown.height:
            raise MbtrainError(f"{source}: label column {column.name!r} holds the class {unknown['value'][0]!r}, "
                               f"which is not one of the task's {len(classes):,} classes")
        return index.get_column("index").cast(pl.Float32).alias(column.name)

    @property
    def width(self) -> int:
        return len(self.state["classes"])

    def output_names(self) -> list[str]:
        return [f"pred_{self.task}_{value}" for value in self.state["classes"]]

    def base_logits(self, sums: LabelSums, index: int) -> list[float]:
        """The log of each class's share: the prior."""
        return [math.log(max(share, 1e-6)) for share in self.state["shares"]]

    @classmethod
    def losses(cls, logits: torch.Tensor, labels: torch.Tensor, tasks: list[TaskType]) -> torch.Tensor:
        parts, start = [], 0
        for j, task in enumerate(tasks):
            end = start + task.width
            parts.append(F.cross_entropy(logits[:, start:end], labels[:, j].long(), reduction="none"))
            start = end
        return torch.stack(parts, dim=1)

    @classmethod
    def output(cls, tasks: list[TaskType], columns: list[int]) -> nn.Module:
        return Softmax(tasks, columns)

    def metrics(self, predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                weights: torch.Tensor | None = None) -> dict[str, Any]:
        return multiclass_metrics(predictions, labels, weights)

    def described(self) -> str:
        return f"multiclass ({self.width} classes)"
