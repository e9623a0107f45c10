"""Binary tasks (click, conversion): 0/1, boolean or true/false labels, log loss on the logit, a probability out."""

from __future__ import annotations

from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from mbtrain.errors import MbtrainError
from mbtrain.metrics import binary_metrics
from mbtrain.tasks.base import LabelSums, TaskType, register

TRUE_TEXT = {"1", "true"}
FALSE_TEXT = {"0", "false"}


class Sigmoid(nn.Module):
    """The binary columns' probabilities."""

    def __init__(self, columns: list[int]) -> None:
        super().__init__()
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.index_select(1, self.columns))


@register("binary")
class Binary(TaskType):
    directions = {"auc": True, "gauc": True, "logloss": False, "ne": False}
    monitor = "auc"
    funnel_stage = True
    table = {"auc": "AUC", "gauc": "GAUC", "pr_auc": "PR AUC", "logloss": "log loss", "ne": "NE",
             "calibration": "calib.", "conditional_auc": "cond. AUC"}
    count_header = "positives"

    @classmethod
    def count_cell(cls, metrics: dict[str, Any]) -> str:
        share = metrics["positives"] / metrics["rows"] if metrics["rows"] else 0.0
        return f"{metrics['positives']:,} ({share:.1%})"

    @classmethod
    def claims(cls, dtype: pl.DataType, zero_one: bool) -> str | None:
        if dtype == pl.Boolean:
            return "boolean"
        if zero_one:
            return "0/1" if dtype.is_numeric() else "true/false text"
        return None

    @classmethod
    def read(cls, column: pl.Series, source: str, state: dict[str, Any]) -> pl.Series:
        dtype = column.dtype
        if dtype == pl.Boolean:
            return column.cast(pl.Float32)
        if dtype.is_numeric():
            values = column.drop_nulls()
            binary_range = dtype.is_integer() and (values.is_empty() or (values.min() >= 0 and values.max() <= 1))
            bad = values.head(0) if binary_range else values.filter((values != 0) & (values != 1))
            if bad.len():
                raise MbtrainError(f"{source}: label column {column.name!r} is not binary: found value {bad[0]!r} "
                                   "(labels must be 0/1/true/false; --task-type names another type)")
            return column.cast(pl.Float32)
        if dtype == pl.String:
            lowered = column.str.strip_chars().str.to_lowercase()
            bad = lowered.drop_nulls().filter(~lowered.drop_nulls().is_in(sorted(TRUE_TEXT | FALSE_TEXT)))
            if bad.len():
                raise MbtrainError(f"{source}: label column {column.name!r} holds text such as {bad[0]!r}; "
                                   "labels must be 0/1/true/false")
            label = pl.col("label")
            return pl.DataFrame({"label": lowered}).select(
                pl.when(label.is_null()).then(None).otherwise(label.is_in(sorted(TRUE_TEXT)).cast(pl.Float32))
            ).to_series().alias(column.name)
        raise MbtrainError(f"{source}: label column {column.name!r} has type {dtype}; labels must be 0/1")

    def base_logits(self, sums: LabelSums, index: int) -> list[float]:
        """Log-odds of the positive rate (purchase at 1% starts at its loss, not at 0.69)."""
        rate = float(sums.mean()[index])
        return [float(torch.logit(torch.tensor(rate).clamp(1e-4, 1 - 1e-4)))]

    @classmethod
    def losses(cls, logits: torch.Tensor, labels: torch.Tensor, tasks: list[TaskType]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")

    @classmethod
    def output(cls, tasks: list[TaskType], columns: list[int]) -> nn.Module:
        return Sigmoid(columns)

    def metrics(self, predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                weights: torch.Tensor | None = None) -> dict[str, Any]:
        return binary_metrics(predictions, labels, groups, weights)
