"""What kind of label a task has, found by name: a task type is one file (binary.py, regression.py) holding its
label check, loss, output activation, metrics and prediction transform, registered with `@register(name)`.

The fit loop, eval, predict and the exported file never ask which type a task is: they go through `TaskSet`, the
run's tasks in output order. Labels travel as float32 [rows, T] in the columns' own units, NaN where a row has no
label for a task (`--missing-labels skip`); each type turns its columns into training targets, per-row losses and,
from the network's logits, predictions in the column's own units. Adding a type: docs/adding-a-task-type.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import polars as pl
import torch
from torch import nn

from mbtrain.errors import MbtrainError
from mbtrain.metrics import conditional_metrics

TASK_TYPES: dict[str, type[TaskType]] = {}  # in registration order: inference tries them in it


@dataclass
class LabelSums:
    """Per task, over the rows that have its label: the sums every type fits its statistics from (a positive rate,
    a target's mean and spread), in one pass that adds up chunk by chunk (streamed data) and rank by rank; with
    --weight-column each row counts its weight."""

    rows: torch.Tensor  # float64 [T] rows with a label
    count: torch.Tensor  # their weight (rows again without --weight-column)
    total: torch.Tensor  # Σ y
    squares: torch.Tensor  # Σ y²
    logged: torch.Tensor  # Σ log1p(y) over the rows with y ≥ 0
    logged_squares: torch.Tensor  # Σ log1p(y)²
    least: torch.Tensor  # min y (+inf without a label)

    @classmethod
    def of(cls, labels: torch.Tensor, weights: torch.Tensor | None = None) -> LabelSums:
        y = labels.to(torch.float64)
        present = ~torch.isnan(y)
        zeroed = torch.where(present, y, 0.0)
        logged = torch.log1p(zeroed.clamp(min=0.0))
        w = present.to(torch.float64) if weights is None else present * weights.to(torch.float64)[:, None]
        return cls(present.sum(dim=0).to(torch.float64), w.sum(dim=0), (w * zeroed).sum(dim=0),
                   (w * zeroed * zeroed).sum(dim=0), (w * logged).sum(dim=0), (w * logged * logged).sum(dim=0),
                   torch.where(present, y, torch.inf).amin(dim=0) if y.shape[0] else
                   torch.full((y.shape[1],), torch.inf, dtype=torch.float64))

    def __add__(self, other: LabelSums) -> LabelSums:
        return LabelSums(self.rows + other.rows, self.count + other.count, self.total + other.total,
                         self.squares + other.squares, self.logged + other.logged,
                         self.logged_squares + other.logged_squares,
                         torch.minimum(self.least, other.least))

    def mean(self) -> torch.Tensor:
        """[T] each task's mean label (a binary task's positive rate), 0 where no row has one."""
        return self.total / torch.where(self.count > 0, self.count, 1.0)


@dataclass
class TaskSettings:
    """What fit's flags say about the tasks (config.DataConfig's fields of the same names)."""

    target_transform: dict[str, str]
    regression_loss: str


class TaskType:
    """One kind of label. Class attributes and classmethods say what the type is; an instance is one task of the
    type, with the statistics fitted on its training labels (`state`, saved in the run's spec).

    Group methods (`losses`, `output`) take every task of the type at once, so that a run of binary tasks computes
    one loss over all its columns, as it did before task types existed."""

    name: ClassVar[str]
    reads_classes: ClassVar[bool] = False  # its labels are classes, read through a vocabulary (read_state's)
    directions: ClassVar[dict[str, bool]]  # the metrics --monitor may name for a main task of this type: higher better?
    monitor: ClassVar[str]  # the --monitor default for a main task of this type
    funnel_stage: ClassVar[bool] = False  # may stand in a funnel (--funnel, ESMM, AITM)
    table: ClassVar[dict[str, str]] = {}  # the summary table's columns for a task of this type: metric → header
    count_header: ClassVar[str] = "rows"  # the summary's last column, count_cell's

    @classmethod
    def count_cell(cls, metrics: dict[str, Any]) -> str:
        """How many rows the task's metrics are over, as the summary's last column shows it."""
        return f"{metrics['rows']:,}"

    def __init__(self, task: str, state: dict[str, Any]) -> None:
        self.task, self.state = task, state

    @classmethod
    def claims(cls, dtype: pl.DataType, zero_one: bool) -> str | None:
        """Why a label column of type `dtype` without --task-type is this type (shown by inspect), or None.
        `zero_one`: every value present is 0/1 (numbers) or true/false / 0/1 (text)."""
        return None

    @classmethod
    def read_state(cls, task: str, values: pl.Series, counts: pl.Series, source: str) -> dict[str, Any]:
        """For a type that `reads_classes`: what reading its column needs (the classes), from the label column's
        distinct values and their counts over the training data; saved in the task's state."""
        return {}

    @classmethod
    def read(cls, column: pl.Series, source: str, state: dict[str, Any]) -> pl.Series:
        """The column as Float32 labels, null where a row has none; a value the type cannot take is one clear
        error naming `source` and the column. `state`: read_state's (or the saved task's)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """The task's output columns (logits and predictions): one, or a multiclass task's one per class."""
        return 1

    def output_names(self) -> list[str]:
        """Its prediction columns' names in predict's output."""
        return [f"pred_{self.task}"]

    @classmethod
    def fit(cls, task: str, sums: LabelSums, index: int, settings: TaskSettings, source: str) -> dict[str, Any]:
        """The task's state (JSON-serialisable) from its training labels' sums."""
        return {}

    def base_logits(self, sums: LabelSums, index: int) -> list[float]:
        """Where the task's logits start (its tower's bias): the best constant prediction, so the first steps
        learn features instead of the prior."""
        raise NotImplementedError

    @classmethod
    def losses(cls, logits: torch.Tensor, labels: torch.Tensor, tasks: list[TaskType]) -> torch.Tensor:
        """[B, n] each row's loss for the n tasks of this type from their logits [B, Σ width] (`labels` [B, n] in
        their own units, 0 where missing: the caller masks those rows out)."""
        raise NotImplementedError

    @classmethod
    def output(cls, tasks: list[TaskType], columns: list[int]) -> nn.Module:
        """A TorchScript-able module: logits [B, C] → the tasks' predictions at their logit `columns` (the same
        number, in the same order), in their own units."""
        raise NotImplementedError

    def metrics(self, predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                weights: torch.Tensor | None = None) -> dict[str, Any]:
        """The task's validation / eval metrics over the rows that have its label (metrics.json): `predictions`
        [rows], or [rows, width] for a task of several columns; `weights` (eval --weighted-metrics): a row of
        weight w counts as w copies of it."""
        raise NotImplementedError

    def described(self) -> str:
        """How inspect and the summary name the task's type and settings."""
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, **self.state}


Kind = TypeVar("Kind", bound=type[TaskType])


def register(name: str) -> Callable[[Kind], Kind]:
    """Class decorator: make a TaskType `--task-type TASK=name`."""

    def add(cls: Kind) -> Kind:
        if name in TASK_TYPES:
            raise ValueError(f"a task type called {name!r} is already registered")
        cls.name = name
        TASK_TYPES[name] = cls
        return cls

    return add


def infer_type(task: str, dtype: pl.DataType, zero_one: bool, source: str) -> tuple[str, str]:
    """(type, reason) for a label column without --task-type: the first registered type that claims it."""
    for name, kind in TASK_TYPES.items():
        reason = kind.claims(dtype, zero_one)
        if reason is not None:
            return name, reason
    raise MbtrainError(f"{source}: label column {task!r} ({dtype}) is neither 0/1 nor numbers; name its type with "
                       f"--task-type {task}={'|'.join(TASK_TYPES)}")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better, from the types' own tables: fit, compare and sweep read it."""
    for kind in TASK_TYPES.values():
        if metric in kind.directions:
            return kind.directions[metric]
    raise KeyError(metric)


def type_of_metrics(metrics: Iterable[str]) -> type[TaskType]:
    """The type whose metrics these are (metrics.json names no type): the first whose default --monitor is among
    them."""
    names = set(metrics)
    return next((kind for kind in TASK_TYPES.values() if kind.monitor in names), next(iter(TASK_TYPES.values())))


def headline(metrics: Iterable[str]) -> str:
    """The metric that speaks for a task whose metrics are these names: its type's default --monitor."""
    return type_of_metrics(metrics).monitor


def monitors() -> list[str]:
    """Every metric --monitor may name, over the registered types."""
    return list(dict.fromkeys(metric for kind in TASK_TYPES.values() for metric in kind.directions))


class TaskOutputs(nn.Module):
    """Logits [B, C] → predictions [B, C] in each column's own units (a probability, seconds, ...): each type's
    output module on its columns, put back in output order. What eval, predict and the exported file end with."""

    def __init__(self, heads: list[nn.Module], columns: list[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.register_buffer("inverse", torch.argsort(torch.tensor(columns, dtype=torch.long)), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for head in self.heads:
            parts.append(head(logits))
        return torch.cat(parts, dim=1).index_select(1, self.inverse)


class TaskSet:
    """The run's tasks in output order (main task first), each an instance of its type, and where each one's
    logits sit among the network's output columns."""

    def __init__(self, tasks: list[TaskType]) -> None:
        self.tasks = tasks
        self.names = [task.task for task in tasks]
        self.widths = [task.width for task in tasks]
        starts = [sum(self.widths[:i]) for i in range(len(tasks))]
        self.columns = [list(range(start, start + width)) for start, width in zip(starts, self.widths, strict=True)]
        by_type: dict[type[TaskType], list[int]] = {}
        for index, task in enumerate(tasks):
            by_type.setdefault(type(task), []).append(index)
        # per type: its tasks' indices, their logit columns, the tasks
        self.groups = [(kind, torch.tensor(indices), torch.tensor([c for i in indices for c in self.columns[i]]),
                        [tasks[i] for i in indices]) for kind, indices in by_type.items()]
        self.single_type = len(self.groups) == 1 and max(self.widths) == 1  # one column a task: all in order
        self.on_device: dict[torch.device, list] = {}  # the groups with their index tensors on each device

    @classmethod
    def from_dict(cls, tasks: list[str], raw: dict[str, dict[str, Any]] | None) -> TaskSet:
        """From a spec's `task_types` (a run saved before task types had binary tasks only)."""
        raw = raw or {task: {"type": "binary"} for task in tasks}
        made = []
        for task in tasks:
            state = dict(raw[task])
            kind = state.pop("type")
            if kind not in TASK_TYPES:
                raise ValueError(f"task {task!r} has an unknown type {kind!r}")
            made.append(TASK_TYPES[kind](task, state))
        return cls(made)

    @classmethod
    def fit(cls, types: dict[str, str], sums: LabelSums, settings: TaskSettings, source: str,
            read_states: list[dict[str, Any]] | None = None) -> TaskSet:
        """Each task of `types` (task: type name, output order) with its state: read_state's (the classes) and
        what its type fits on the training sums."""
        read_states = read_states or [{} for _ in types]
        return cls([TASK_TYPES[kind](task, {**read, **TASK_TYPES[kind].fit(task, sums, i, settings, source)})
                    for i, ((task, kind), read) in enumerate(zip(types.items(), read_states, strict=True))])

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {task.task: task.to_dict() for task in self.tasks}

    @property
    def types(self) -> list[str]:
        return [task.name for task in self.tasks]

    def output_names(self) -> list[str]:
        """predict's prediction columns, in output column order."""
        return [name for task in self.tasks for name in task.output_names()]

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] each row's loss for each task, 0 where the row has no label for it."""
        present = ~torch.isnan(labels)
        filled = torch.where(present, labels, 0.0)
        if self.single_type:
            kind, _, _, members = self.groups[0]
            losses = kind.losses(logits, filled, members)
        else:
            losses = torch.empty_like(filled)
            if logits.device not in self.on_device:  # once: a copy to the GPU every step waits for it
                self.on_device[logits.device] = [(kind, indices.to(logits.device), columns.to(logits.device), members)
                                                 for kind, indices, columns, members in self.groups]
            for kind, indices, columns, members in self.on_device[logits.device]:
                losses = losses.index_copy(1, indices, kind.losses(logits.index_select(1, columns),
                                                                   filled.index_select(1, indices), members))
        return torch.where(present, losses, 0.0)

    def base_logits(self, sums: LabelSums) -> torch.Tensor:
        """[C] where every output column's logit starts."""
        return torch.tensor([value for i, task in enumerate(self.tasks) for value in task.base_logits(sums, i)],
                            dtype=torch.float32)

    def outputs(self) -> TaskOutputs:
        return TaskOutputs([kind.output(members, columns.tolist()) for kind, _, columns, members in self.groups],
                           [c for _, _, columns, _ in self.groups for c in columns.tolist()])

    def metrics(self, predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None,
                funnel: list[str] | None = None, weights: torch.Tensor | None = None) -> dict[str, dict[str, Any]]:
        """{task: its type's metrics over the rows that have its label}: predictions [rows, C] and labels
        [rows, T] in output order; `groups` (--group-by's keys) adds the grouped metrics, `funnel` each later
        stage's conditional AUC (metrics.conditional_metrics), `weights` [rows] weighs the rows."""
        metrics = {}
        for i, task in enumerate(self.tasks):
            present = ~torch.isnan(labels[:, i])
            every = bool(present.all())
            columns = self.columns[i]
            predicted = predictions[:, columns[0]] if len(columns) == 1 else predictions[:, columns[0]:columns[-1] + 1]
            metrics[task.task] = task.metrics(
                predicted if every else predicted[present], labels[:, i] if every else labels[present, i],
                groups if groups is None or every else groups[present],
                weights if weights is None or every else weights[present])
        if funnel is not None:  # a funnel's tasks are binary: one column each, in task order
            for task, values in conditional_metrics(predictions, labels, self.names, funnel, weights).items():
                metrics[task].update(values)
        return metrics

    def check_monitor(self, monitor: str) -> None:
        """--monitor must be a metric of the main task's type."""
        main = self.tasks[0]
        if monitor not in main.directions:
            raise MbtrainError(f"--monitor {monitor}: the main task {main.task!r} is {main.name}; its metrics are "
                               f"{', '.join(main.directions)}")


def check_funnel_types(types: dict[str, str], funnel: list[str] | None) -> None:
    """A funnel's stages (--funnel, ESMM, AITM) must be tasks that may stand in one: binary."""
    for task in funnel or []:
        if not TASK_TYPES[types[task]].funnel_stage:
            raise MbtrainError(f"task {task!r} is {types[task]}: a funnel's stages (--funnel, --model esmm or aitm) "
                               "are binary tasks, each implying the one before it")
