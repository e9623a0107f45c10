"""Rich tables for people: per-task metrics, column roles, and the end-of-run summary."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table

from mbtrain.data.schema import Schema
from mbtrain.models import MODELS, ModelConfig
from mbtrain.optim import state_floats_per_row
from mbtrain.tasks import TASK_TYPES, TaskType, headline, type_of_metrics


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


HEADERS = {metric: header for kind in TASK_TYPES.values() for metric, header in kind.table.items()}
"""Every metric's column header, the task types' own (compare's tables read it too)."""


def metrics_table(metrics: dict[str, Any], title: str, caption: str | None = None) -> Table | Group:
    """One row per task (main task first and marked) from a metrics.json-shaped dict; narrow enough for an
    80-column terminal. Each type of task, told by its metrics (tasks.type_of_metrics), gets a table of its own
    with its type's columns (TaskType.table), the main task's first, the caption under the last."""
    main = metrics["main_task"]
    kinds: dict[type[TaskType], dict[str, Any]] = {}
    for task, values in metrics["tasks"].items():
        kinds.setdefault(type_of_metrics(values), {})[task] = values
    order = sorted(kinds, key=lambda kind: main not in kinds[kind])
    rows = metrics["tasks"][main]["rows"]
    return _stacked([_table(kind, kinds[kind], main, f"{title} · {rows:,} rows" if i == 0 else f"{kind.name} tasks",
                            caption if i == len(order) - 1 else None) for i, kind in enumerate(order)])


def _stacked(tables: list[Table]) -> Table | Group:
    return tables[0] if len(tables) == 1 else Group(*tables)


def _table(kind: type[TaskType], tasks: dict[str, Any], main_task: str, title: str, caption: str | None) -> Table:
    """The tasks of one type: its columns where some task has the metric, its count column, notes on what the
    grouped and conditional metrics cover."""
    shown = [key for key in kind.table if any(key in values for values in tasks.values())]
    notes = [caption] if caption else []
    for key, rows, holding in (("gauc", "gauc_rows", "both classes"), ("gxauc", "gxauc_rows", "a pair of targets "
                                                                                             "that differ")):
        if key in shown:
            shares = ", ".join(f"{task} {_share(values[rows])}" for task, values in tasks.items())
            notes.append(f"{HEADERS[key]} covers the rows in groups holding {holding}: {shares}")
    staged = {task: values for task, values in tasks.items() if "conditional_auc" in values}
    if staged:
        stages = ", ".join(f"{task} | {values['conditional_on']} on {values['conditional_rows']:,} rows"
                           for task, values in staged.items())
        notes.append(f"cond. AUC: a stage's probability given the stage before, on the rows where that one is 1: "
                     f"{stages}")
    table = Table(title=title, caption="\n".join(notes) or None, caption_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    table.add_column("task")
    for key in shown:
        table.add_column(kind.table[key], justify="right")
    table.add_column(kind.count_header, justify="right")
    for task, values in tasks.items():
        name = f"{task} (main)" if task == main_task else task
        table.add_row(name, *(_number(values.get(key)) for key in shown), kind.count_cell(values))
    return table


def model_text(model: dict[str, Any], funnel: list[str] | None) -> str:
    """The model as the summary names it, e.g. "ple (2 levels, 8 shared + 1 per task experts)", "esmm (funnel
    click → cart → purchase)", "mmoe with funnel click → cart → purchase"."""
    config = ModelConfig(**model)
    kind = MODELS[config.model]
    name = kind.describe(config)
    if funnel is None:
        return name
    stages = " → ".join(funnel)
    return f"{name} (funnel {stages})" if kind.always_funnel else f"{name} with funnel {stages}"


def _share(value: float) -> str:
    return f"{value:.1%}" if 0 < value < 0.001 or 0.999 < value < 1 else f"{value:.0%}"


def schema_table(schema: Schema, title: str) -> Table:
    """Every column's role, type, distinct values (a bag's: its elements'; a vector's: none counted), null share
    and why (a vector's length)."""
    table = Table(title=title)
    for heading, justify in (("column", "left"), ("type", "left"), ("role", "left"), ("distinct", "right"),
                             ("null share", "right"), ("why", "left")):
        table.add_column(heading, justify=justify)
    styles = {"label": "bold magenta", "categorical": "cyan", "numeric": "green",
              "categorical+numeric": "cyan", "bag": "cyan", "vector": "green", "excluded": "dim"}
    for column in schema.columns:
        distinct = "—" if column.distinct is None else f"{column.distinct:,}"
        table.add_row(column.name, column.dtype, f"[{styles[column.role]}]{column.role}[/]", distinct,
                      f"{column.null_share:.1%}", column.reason)
    return table


def bag_lines(schema: Schema, max_bag: int) -> list[str]:
    """A line per bag: its elements, its lists' lengths and what --max-bag keeps of them."""
    lines = []
    for column in schema.columns:
        if column.role == "bag" and column.lengths is not None:
            mean, longest = column.lengths
            kept = (f"each row keeps its last {max_bag} (--max-bag)" if longest > max_bag
                    else f"none longer than --max-bag {max_bag}")
            lines.append(f"bag {column.name}: {column.distinct:,} distinct elements; lists of {mean:.1f} on "
                         f"average, {longest:,} at most; {kept}")
    return lines


def history_line(entry: dict[str, Any], main_task: str, monitor: str = "auc") -> str:
    """One line per validation for logs (each epoch's end, and inside it with --validate-every): train losses, each
    task's headline validation metric (AUC for a binary task, RMSE for a regression one) and the main task's
    --monitor metric, time; `*` marks a new best validation."""
    losses = " ".join(f"{t}={v:.4f}" for t, v in entry["train_loss"].items())
    shown = {t: headline(m) for t, m in entry["valid"].items()}
    values = ", ".join(f"{HEADERS.get(metric, metric)} " + " ".join(
        f"{t}={_number(m[metric])}" for t, m in entry["valid"].items() if shown[t] == metric)
        for metric in dict.fromkeys(shown.values()))
    monitored = "" if monitor == shown[main_task] else \
        f" | {main_task} {monitor} {_number(entry['valid'][main_task][monitor])}"
    flag = " *" if entry.get("best") else ""
    where = f"epoch {entry['epoch']}" if "progress" not in entry else \
        f"epoch {entry['epoch']} at {math.floor(100 * entry['progress'])}% (step {entry['step']:,})"
    return (f"{where}: loss {losses} | valid {values}{monitored} | "
            f"{entry['seconds']:.1f}s, {entry['rows_per_second']:,.0f} rows/s{flag}")


TABLE_COLUMNS_SHOWN = 4  # the summary names the biggest slices, and sums the rest


def table_text(slices: list[tuple[str, int]], dim: int, optimizer: str) -> str:
    """Each column's slice of the embedding table in rows and bytes, with --table-optimizer's state, largest
    first (the few biggest named, the rest summed), and the whole table's."""
    per_row = dim * 4
    state_per_row = state_floats_per_row(optimizer, dim) * 4
    ordered = sorted(slices, key=lambda item: -item[1])
    shown = [f"{name} {rows:,} rows {_bytes(rows * per_row)} + {_bytes(rows * state_per_row)}"
             for name, rows in ordered[:TABLE_COLUMNS_SHOWN]]
    rest = ordered[TABLE_COLUMNS_SHOWN:]
    if rest:
        rows = sum(r for _, r in rest)
        shown.append(f"the other {len(rest)} columns {rows:,} rows {_bytes(rows * per_row)} + "
                     f"{_bytes(rows * state_per_row)}")
    total = sum(rows for _, rows in slices)
    return (f"embedding table ({dim} floats a row; + the {optimizer} state): {'; '.join(shown)}; in all "
            f"{total:,} rows, {_bytes(total * (per_row + state_per_row))}")


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"
