"""`mbtrain compare`: finished runs side by side, so that a sweep can be read as one table.

Runs whose settings are the same but for --seed are one row (mean ± sample std over them): a difference between
rows only means something next to the spread that the seed alone causes. Rows come in the order of each row's
first run as given (a glob's matches sorted by name), never sorted by a metric, so that the table keeps its
shape as runs are added.
"""

from __future__ import annotations

import glob
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from mbtrain.config import RunConfig
from mbtrain.errors import MbtrainError, first_line
from mbtrain.report import METRIC_COLUMNS

# settings that leave a run's results alone (or, for seed, make the repeats a row averages over): never a column
NOT_COMPARED = ("seed", "threads", "device", "memory_budget", "tensorboard")
# the metrics the table shows for a main task (and its --monitor); other tasks show AUC only; --json holds all
MAIN_METRICS = ("auc", "gauc", "conditional_auc", "logloss", "ne")
SETTING_COLUMNS = 3  # differing settings shown a column each; beyond, one column lists them row by row
Stats = dict[str, float | int | None]  # {"mean", "std", "n"} over the runs of a row


@dataclass
class Row:
    """One set of settings: its runs (one per seed, or repeats), and their metrics at each run's best epoch."""

    runs: list[str]
    seeds: list[int]
    settings: dict[str, Any]
    main_task: str
    tasks: dict[str, dict[str, Stats]]  # task -> metric -> stats, main task first
    best_epoch: Stats
    epochs_run: Stats
    seconds_per_epoch: Stats

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "n": len(self.runs), "seeds": self.seeds, "settings": self.settings,
                "main_task": self.main_task, "tasks": self.tasks, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "seconds_per_epoch": self.seconds_per_epoch}


@dataclass
class Comparison:
    """The rows, the settings that differ between them (the table's setting columns) and a line per run
    that could not be compared."""

    rows: list[Row]
    columns: list[str]
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": [row.to_dict() for row in self.rows], "skipped": self.skipped}


@dataclass
class _Run:
    path: str
    seed: int
    settings: dict[str, Any]
    metrics: dict[str, Any]
    seconds_per_epoch: float | None


def compare_runs(patterns: list[str]) -> Comparison:
    """Read the finished runs that `patterns` (run directories or globs such as 'runs/*') name and group those
    that differ only in --seed. A run that cannot be read, or has not finished, becomes a line in `skipped`;
    MbtrainError when no run at all can be compared."""
    skipped: list[str] = []
    runs: list[_Run] = []
    seen: set[Path] = set()  # a run named twice ('runs/*' and runs/a) counts once
    for pattern in patterns:
        paths = _expand(pattern)
        if not paths:
            skipped.append(f"{pattern}: no run directory matches")
        for path in paths:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                runs.append(_read(path))
            except MbtrainError as exc:
                skipped.append(str(exc))
    if not runs:
        raise MbtrainError(_nothing_to_compare(skipped))
    groups: dict[str, list[_Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.settings, sort_keys=True), []).append(run)
    columns = [key for key in runs[0].settings if len({json.dumps(run.settings[key]) for run in runs}) > 1]
    return Comparison([_row(group) for group in groups.values()], columns, skipped)


def _expand(pattern: str) -> list[Path]:
    """A glob's matches sorted, leaving out without a word what `runs/*` may hold besides runs: files (notes,
    a comparison's --json) and hidden directories (fit's .RUN.partial staging); anything else as it is."""
    if not any(char in pattern for char in "*?[") or Path(pattern).exists():
        return [Path(pattern)]
    matches = [Path(match) for match in sorted(glob.glob(pattern))]
    return [match for match in matches if match.is_dir() and not match.name.startswith(".")]


def _read(path: Path) -> _Run:
    """The finished run in `path`; MbtrainError with one line naming the directory where there is none."""
    if not path.is_dir():
        raise MbtrainError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    if not (path / "config.json").is_file():
        raise MbtrainError(f"{path}: not an mbtrain run (no config.json)")
    if not (path / "metrics.json").is_file():
        raise MbtrainError(f"{path}: unfinished run (no metrics.json): still training, or interrupted")
    raw = _load(path, "config.json")
    try:
        flat = RunConfig.from_dict(raw).flat()  # an older run's missing settings take today's defaults
    except (TypeError, AttributeError) as exc:
        raise MbtrainError(f"{path}: config.json holds settings this mbtrain cannot read ({first_line(exc)})") from None
    paths = raw.get("paths") if isinstance(raw.get("paths"), dict) else {}
    settings = {"data": paths.get("data"), **{k: v for k, v in flat.items() if k not in NOT_COMPARED}}
    if paths.get("valid"):  # absolute, where the flag may be relative to wherever fit ran
        settings["valid"] = paths["valid"]
    metrics = _load(path, "metrics.json")
    main, tasks = metrics.get("main_task"), metrics.get("tasks")
    if not (isinstance(tasks, dict) and isinstance(main, str) and main in tasks
            and all(isinstance(values, dict) for values in tasks.values())):
        raise MbtrainError(f"{path}: metrics.json is not an mbtrain metrics file (no metrics for its main task)")
    return _Run(str(path), flat["seed"], settings, metrics, _seconds_per_epoch(path / "history.jsonl"))


def _load(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((path / name).read_text())
    except OSError as exc:
        raise MbtrainError(f"{path}: {name} cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise MbtrainError(f"{path}: {name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise MbtrainError(f"{path}: {name} holds no JSON object")
    return data


def _seconds_per_epoch(history: Path) -> float | None:
    """Mean epoch wall time; None where history.jsonl is missing or damaged: the metrics still compare."""
    try:
        seconds = [json.loads(line).get("seconds") for line in history.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, AttributeError):
        return None
    return _stats(seconds)["mean"]


def _nothing_to_compare(skipped: list[str]) -> str:
    if not skipped:
        return "nothing to compare: give run directories or a glob such as 'runs/*'"
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"nothing to compare: {'; '.join(skipped[:3])}{more}"


def _row(runs: list[_Run]) -> Row:
    tasks: dict[str, dict[str, Stats]] = {}
    for task in dict.fromkeys(task for run in runs for task in run.metrics["tasks"]):
        per_run = [run.metrics["tasks"].get(task, {}) for run in runs]
        metrics = dict.fromkeys(metric for values in per_run for metric in values)  # older runs lack newer ones
        tasks[task] = {metric: _stats([values.get(metric) for values in per_run]) for metric in metrics}
    return Row(
        runs=[run.path for run in runs],
        seeds=[run.seed for run in runs],
        settings=runs[0].settings,
        main_task=runs[0].metrics["main_task"],
        tasks=tasks,
        best_epoch=_stats([run.metrics.get("best_epoch") for run in runs]),
        epochs_run=_stats([run.metrics.get("epochs_run") for run in runs]),
        seconds_per_epoch=_stats([run.seconds_per_epoch for run in runs]),
    )


def _stats(values: list[Any]) -> Stats:
    """Mean, sample standard deviation (n - 1; None below two values) and n over the finite numbers among
    `values`: a metric is null where it is undefined (AUC on one class) and then left out."""
    numbers = [float(value) for value in values
               if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)]
    return {"mean": statistics.fmean(numbers) if numbers else None,
            "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
            "n": len(numbers)}


def comparison_table(comparison: Comparison) -> Table:
    """A row per Row: its run directories, the settings that differ, n (where some row averages over more than
    one run), then by task name the main task's AUC, GAUC, conditional AUC (funnels), log loss, NE (and --monitor
    metric) and the other
    tasks' AUC, '—' where a row lacks one; best epoch and seconds per epoch. The main task is that of most rows
    (the first row's on a tie). Narrow: one space between columns, a std beneath its mean, and a cell too narrow
    for the terminal folds rather than cut a number short."""
    rows = comparison.rows
    main_task = Counter(row.main_task for row in rows).most_common(1)[0][0]
    monitors = [row.settings["monitor"] for row in rows if row.main_task == main_task]
    metric_columns = [(main_task, metric) for metric in dict.fromkeys([*MAIN_METRICS, *monitors])
                      if metric == "auc" or any(metric in row.tasks.get(main_task, {}) for row in rows)]
    metric_columns += [(task, "auc") for task in dict.fromkeys(task for row in rows for task in row.tasks)
                       if task != main_task]
    repeated = any(len(row.runs) > 1 for row in rows)
    caption = "validation metrics at each run's best epoch"
    if repeated:
        caption += "; runs that differ only in --seed are one row: mean and ±sample std over its n runs"
    runs = sum(len(row.runs) for row in rows)
    table = Table(title=f"{runs} run{'s' if runs > 1 else ''} compared", caption=caption, caption_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("run", overflow="fold")
    separate = len(comparison.columns) <= SETTING_COLUMNS
    for key in comparison.columns if separate else ["settings"] * bool(comparison.columns):
        table.add_column(key.replace("_", "-"), overflow="fold")
    if repeated:
        table.add_column("n", justify="right")
    for task, metric in metric_columns:
        table.add_column(f"{escape(task)}\n{METRIC_COLUMNS.get(metric, metric)}", justify="right", no_wrap=True,
                         min_width=6)
    table.add_column("best\nepoch", justify="right", no_wrap=True)
    table.add_column("s/epoch", justify="right", no_wrap=True)
    for row, label in zip(rows, _labels(rows), strict=True):
        n = len(row.runs)
        settings = [_setting(key, row.settings[key]) for key in comparison.columns]
        if separate:
            cells = [label, *settings]
        else:  # one column of 'flag value' lines keeps many differing settings readable
            cells = [label, "\n".join(f"--{key.replace('_', '-')} {value}"
                                      for key, value in zip(comparison.columns, settings, strict=True))]
        if repeated:
            cells.append(str(n))
        cells += [_cell(row.tasks.get(task, {}).get(metric), n, 4) for task, metric in metric_columns]
        cells += [_cell(row.best_epoch, n, 1 if n > 1 else 0), _cell(row.seconds_per_epoch, n, 2)]
        table.add_row(*cells)
    return table


def _labels(rows: list[Row]) -> list[str]:
    """A row's first run directory by name (by path where names repeat), '+k' for the row's other runs."""
    names = [Path(row.runs[0]).name for row in rows]
    if len(set(names)) < len(names):
        names = [row.runs[0] for row in rows]
    return [escape(f"{name} +{len(row.runs) - 1}" if len(row.runs) > 1 else name)
            for name, row in zip(names, rows, strict=True)]


def _setting(key: str, value: Any) -> str:
    """Lists comma-joined; data files under the working directory relative to it."""
    if value is None:
        return "—"
    if key in ("data", "valid") and isinstance(value, str) and Path(value).is_relative_to(Path.cwd()):
        value = str(Path(value).relative_to(Path.cwd()))
    return escape(", ".join(map(str, value)) if isinstance(value, list) else str(value))


def _cell(stats: Stats | None, n: int, digits: int) -> str:
    """The mean, '±std' beneath it (a column as narrow as one number) and '(n=k)' where only k of the row's n
    runs have the metric (it is null where undefined); one value as it is."""
    if stats is None or stats["mean"] is None:
        return "—"
    text = f"{stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        text += f"\n±{stats['std']:.{digits}f}"
    return text if stats["n"] == n else f"{text}\n(n={stats['n']})"
