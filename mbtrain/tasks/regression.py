"""Regression tasks (watch time, dwell seconds, order value, a rating): any numbers, a squared error or Huber loss
on the target after --target-transform, predictions back in the column's own units.

The transform is fitted on the training labels and saved in the run: `log1p` (the default for a column with no
negative value: watch time's long tail) takes log1p(y) and standardises it; `standardize` standardises y; `none`
trains on y as it is (a loss in the column's squared units: what the balancers are for). The network predicts the
transformed target z; the output inverts it (expm1(z·σ + μ) for log1p), so eval, predict and the exported file
speak the column's units. Under log1p the prediction is exp of a mean log, nearer the median than the mean of a
skewed target: RMSE in the column's units pays for that, XAUC (ordering) does not.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from mbtrain.errors import MbtrainError
from mbtrain.metrics import regression_metrics
from mbtrain.tasks.base import LabelSums, TaskSettings, TaskType, register

TRANSFORMS = ("log1p", "standardize", "none")
LOSSES = ("mse", "huber")
HUBER_DELTA = 1.0  # in the transformed target's units: one standard deviation under log1p and standardize


def _key(state: dict[str, Any]) -> tuple[float, float, bool, bool]:
    return float(state["mean"]), float(state["std"]), state["transform"] == "log1p", state["loss"] == "huber"


@functools.cache
def _constants(tasks: tuple[tuple[float, float, bool, bool], ...], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, scale, log1p mask, Huber mask) of a run's regression tasks on `device`, made once: built from
    Python numbers every step, they were a host-to-device copy a step on a GPU (each one waits for the device)."""
    shift, scale, logged, huber = zip(*tasks, strict=True)
    return (torch.tensor(shift, dtype=torch.float32, device=device), torch.tensor(scale, dtype=torch.float32,
            device=device), torch.tensor(logged, device=device), torch.tensor(huber, device=device))


class Untransform(nn.Module):
    """The regression columns' transformed predictions z back in their own units: z·scale + shift, then expm1
    where the target was log1p'd."""

    def __init__(self, tasks: list[TaskType], columns: list[int]) -> None:
        super().__init__()
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.register_buffer("scale", torch.tensor([t.state["std"] for t in tasks]), persistent=False)
        self.register_buffer("shift", torch.tensor([t.state["mean"] for t in tasks]), persistent=False)
        self.register_buffer("logged", torch.tensor([t.state["transform"] == "log1p" for t in tasks]),
                             persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.index_select(1, self.columns) * self.scale + self.shift
        return torch.where(self.logged, torch.expm1(z), z)


@register("regression")
class Regression(TaskType):
    directions = {"rmse": False, "mae": False, "r2": True, "xauc": True, "gxauc": True}
    monitor = "rmse"
    table = {"rmse": "RMSE", "mae": "MAE", "r2": "R²", "xauc": "XAUC", "gxauc": "GXAUC", "mean_target": "mean target"}

    @classmethod
    def claims(cls, dtype: pl.DataType, zero_one: bool) -> str | None:
        return "numbers, not only 0/1" if dtype.is_numeric() else None

    @classmethod
    def read(cls, column: pl.Series, source: str, state: dict[str, Any]) -> pl.Series:
        if not column.dtype.is_numeric():
            shown = column.drop_nulls()
            found = f" such as {shown[0]!r}" if shown.len() else ""
            raise MbtrainError(f"{source}: label column {column.name!r} holds {column.dtype}{found}; a regression "
                               "task's labels must be numbers")
        values = column.cast(pl.Float32, strict=False).fill_nan(None)
        infinite = column.filter(values.is_infinite())
        if infinite.len():
            raise MbtrainError(f"{source}: label column {column.name!r} holds {infinite[0]}; a regression task's "
                               "labels must be finite float32 numbers")
        return values

    @classmethod
    def fit(cls, task: str, sums: LabelSums, index: int, settings: TaskSettings, source: str) -> dict[str, Any]:
        count, least = float(sums.count[index]), float(sums.least[index])
        if count == 0:
            raise MbtrainError(f"{source}: regression task {task!r} has no label (of a positive weight) in the "
                               "training rows")
        transform = settings.target_transform.get(task) or ("log1p" if least >= 0 else "standardize")
        if transform == "log1p" and least < 0:
            raise MbtrainError(f"--target-transform {task}=log1p: {source} has the negative value {least:g} in "
                               f"{task!r}; use standardize or none")
        if transform == "none":
            return {"transform": transform, "loss": settings.regression_loss, "mean": 0.0, "std": 1.0}
        total, squares = ((sums.logged[index], sums.logged_squares[index]) if transform == "log1p"
                          else (sums.total[index], sums.squares[index]))
        mean = float(total) / count
        std = math.sqrt(max(float(squares) / count - mean * mean, 0.0))
        return {"transform": transform, "loss": settings.regression_loss, "mean": mean, "std": std if std > 0 else 1.0}

    def base_logits(self, sums: LabelSums, index: int) -> list[float]:
        """The mean transformed target: 0 once standardised, the label's mean under `none`."""
        return [float(sums.mean()[index]) if self.state["transform"] == "none" else 0.0]

    @classmethod
    def targets(cls, labels: torch.Tensor, tasks: list[TaskType]) -> torch.Tensor:
        """The labels [B, n] as the network learns them (transformed)."""
        shift, scale, logged, _ = _constants(tuple(_key(t.state) for t in tasks), labels.device)
        return (torch.where(logged, torch.log1p(labels.clamp(min=0.0)), labels) - shift) / scale

    @classmethod
    def losses(cls, logits: torch.Tensor, labels: torch.Tensor, tasks: list[TaskType]) -> torch.Tensor:
        targets = cls.targets(labels, tasks)
        squared = F.mse_loss(logits, targets, reduction="none")
        if not any(t.state["loss"] == "huber" for t in tasks):
            return squared
        huber = _constants(tuple(_key(t.state) for t in tasks), logits.device)[3]
        return torch.where(huber, F.huber_loss(logits, targets, reduction="none", delta=HUBER_DELTA), squared)

    @classmethod
    def output(cls, tasks: list[TaskType], columns: list[int]) -> nn.Module:
        return Untransform(tasks, columns)

    def metrics(self, predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                weights: torch.Tensor | None = None) -> dict[str, Any]:
        return regression_metrics(predictions, labels, groups, weights)

    def described(self) -> str:
        return f"regression ({self.state['loss']} on {self.state['transform']})"
