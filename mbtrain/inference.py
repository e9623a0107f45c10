"""Score files with a trained run (directory or checkpoint) or an exported model: eval and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch

from mbtrain.checkpoint import Checkpoint, is_export, run_checkpoint
from mbtrain.data.labels import LabelColumns
from mbtrain.data.schema import check_funnel, group_keys
from mbtrain.data.stream import parquet_files, read_files
from mbtrain.errors import MbtrainError
from mbtrain.export import load_onnx, load_torchscript
from mbtrain.models.funnel import conditional_probabilities
from mbtrain.models.scoring import ModelSpec, Predictions, predict_rows


def load_scorer(path: Path) -> tuple[torch.nn.Module, ModelSpec]:
    """A module mapping (categorical, numeric) to probabilities, and the spec to encode rows for it."""
    if path.is_dir():
        path = run_checkpoint(path)
    elif not path.exists():
        raise MbtrainError(f"{path}: run directory or exported model not found")
    elif is_export(path):
        return load_torchscript(path)
    elif path.suffix.lower() == ".onnx":
        return load_onnx(path)
    model, spec = Checkpoint.load(path).scoring_model(path)
    return Predictions(model, spec.task_set).eval(), spec


def _read(path: Path, data: Path) -> tuple[torch.nn.Module, ModelSpec, pl.DataFrame]:
    module, spec = load_scorer(path)
    return module, spec, read_files(parquet_files(data))  # a file, or a directory / glob of Parquet files


def _score(module: torch.nn.Module, spec: ModelSpec, frame: pl.DataFrame, data: Path) -> torch.Tensor:
    return predict_rows(module, *spec.encoders.encode(frame, str(data)))


def evaluate(path: Path, data: Path, group_by: str | None = None, weight_column: str | None = None
             ) -> dict[str, Any]:
    """Every metric of every task on a labelled file (metrics.json shape), each task's over the rows that have its
    label; the grouped metrics over `group_by`'s groups; with `weight_column`, each row weighing its weight.
    Labels, weights and group keys are checked before the rows are scored."""
    module, spec, frame = _read(path, data)
    tasks = spec.task_set
    reader = LabelColumns(spec.tasks, tasks.types, "skip", weight_column, [task.state for task in tasks.tasks])
    labels, weights = reader.read(frame, str(data)), reader.weights(frame, str(data))
    check_funnel(labels, spec.tasks, spec.funnel, str(data))
    groups = group_keys(frame, str(data), group_by) if group_by else None
    predictions = _score(module, spec, frame, data)
    return {"main_task": spec.main_task,
            "tasks": tasks.metrics(predictions, labels, groups, spec.funnel, weights),
            "data": str(data), "model": str(path), **({"group_by": group_by} if group_by else {}),
            **({"weight_column": weight_column} if weight_column else {})}


def trained_weight_column(path: Path) -> str | None:
    """The --weight-column a run (directory or checkpoint) trained with; None for an exported file, which does not
    say, and for a run without one."""
    if path.is_dir():
        path = run_checkpoint(path)
    if not path.is_file() or is_export(path) or path.suffix.lower() == ".onnx":
        return None
    config = Checkpoint.load(path).config or {}
    return config.get("data", {}).get("weight_column")


def predict(path: Path, data: Path, keep: list[str], conditional: bool = False) -> pl.DataFrame:
    """`keep` columns, then each task's predictions, rows in input order: pred_<task> (a probability, or a regression
    task's prediction in the column's units; a multiclass task's most likely class, after pred_<task>_<class>, each
    class's probability); with `conditional` (funnel models) then one cond_<task> column per task: its probability
    given the funnel stage before it."""
    module, spec, frame = _read(path, data)
    if conditional and spec.funnel_order is None:
        raise MbtrainError(f"--conditional: {path} has no funnel (fit with --funnel, --model esmm or --model aitm)")
    tasks = spec.task_set
    keep = list(dict.fromkeys(keep))
    made = {*tasks.output_names(), *(f"{prefix}_{task}" for task in spec.tasks
                                     for prefix in ("pred", "cond")[: 1 + conditional])}
    for name in keep:
        if name not in frame.columns:
            raise MbtrainError(f"{data}: column {name!r} (from --keep) not found")
        if name in made:
            raise MbtrainError(f"--keep {name}: the output already has a column of that name")
    predictions = _score(module, spec, frame, data)
    columns: dict[str, Any] = {}
    for task, names, where in zip(tasks.tasks, [t.output_names() for t in tasks.tasks], tasks.columns, strict=True):
        columns |= {name: predictions[:, column].numpy() for name, column in zip(names, where, strict=True)}
        if task.width > 1:  # each class's probability, then the most likely class
            columns[f"pred_{task.task}"] = pl.Series(task.state["classes"]).gather(
                pl.Series(predictions[:, where[0] : where[-1] + 1].argmax(dim=1).numpy()))
    if conditional:
        given = conditional_probabilities(predictions, spec.funnel_order)
        columns |= {f"cond_{task}": given[:, i].numpy() for i, task in enumerate(spec.tasks)}
    return pl.concat([frame.select(keep), pl.DataFrame(columns)], how="horizontal")
