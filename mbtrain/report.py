"""Rich tables for people: per-task metrics, column roles, and the end-of-run summary."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mbtrain.data.schema import Schema


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def metrics_table(metrics: dict[str, Any], title: str, caption: str | None = None) -> Table:
    """One row per task (main task first and marked) from a metrics.json-shaped dict."""
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("task")
    table.add_column("AUC", justify="right")
    table.add_column("log loss", justify="right")
    table.add_column("positives", justify="right")
    table.add_column("rows", justify="right")
    for task, values in metrics["tasks"].items():
        name = f"{task} (main)" if task == metrics["main_task"] else task
        share = values["positives"] / values["rows"] if values["rows"] else 0.0
        table.add_row(name, _number(values["auc"]), _number(values["logloss"]),
                      f"{values['positives']:,} ({share:.1%})", f"{values['rows']:,}")
    return table


def schema_table(schema: Schema, title: str) -> Table:
    table = Table(title=title)
    for heading, justify in (("column", "left"), ("type", "left"), ("role", "left"), ("distinct", "right"),
                             ("null share", "right"), ("why", "left")):
        table.add_column(heading, justify=justify)
    styles = {"label": "bold magenta", "categorical": "cyan", "numeric": "green",
              "categorical+numeric": "cyan", "excluded": "dim"}
    for column in schema.columns:
        distinct = "—" if column.distinct is None else f"{column.distinct:,}"
        table.add_row(column.name, column.dtype, f"[{styles[column.role]}]{column.role}[/]", distinct,
                      f"{column.null_share:.1%}", column.reason)
    return table


def history_line(entry: dict[str, Any], main_task: str) -> str:
    """One line per epoch for logs: train losses, validation AUCs, time."""
    losses = " ".join(f"{t}={v:.4f}" for t, v in entry["train_loss"].items())
    aucs = " ".join(f"{t}={_number(m['auc'])}" for t, m in entry["valid"].items())
    flag = " *" if entry.get("best") else ""
    return (f"epoch {entry['epoch']}: loss {losses} | valid AUC {aucs} | "
            f"{entry['seconds']:.1f}s, {entry['rows_per_second']:,.0f} rows/s{flag}")
