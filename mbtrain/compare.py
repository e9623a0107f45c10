"""`mbtrain compare`: finished runs side by side, so that a sweep can be read as one table.

Runs whose settings are the same but for --seed are one row (mean ± sample std over them): a difference between
rows only means something next to the spread that the seed alone causes. Rows come in the order of each row's
first run as given (a glob's matches sorted by name), never sorted by a metric, so that the table keeps its
shape as runs are added.

With a baseline (`--baseline KEY=VALUE`, the one row whose setting KEY has that value) every other row is paired
with it seed by seed on the validation metrics of each run's best epoch: the baseline's main task's --monitor
metric, and every task in its type's default metric (AUC, RMSE), as a mean difference with stats.METHOD, seeds
won and a verdict.
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from mbtrain.config import RunConfig, setting_sections
from mbtrain.errors import MbtrainError, first_line
from mbtrain.report import HEADERS
from mbtrain.stats import ADJUSTMENT, METHOD, Paired, adjust, paired
from mbtrain.sweep.protocol import SPLITS
from mbtrain.tasks import headline, higher_is_better

# settings that leave a run's results alone (or, for seed, make the repeats a row averages over): never a column
NOT_COMPARED = ("seed", "threads", "device", "memory_budget", "tensorboard")
# the metrics the table shows for a main task, those its type has (and its --monitor, or its type's default);
# other tasks show their type's default metric only (AUC, RMSE); --json holds all
MAIN_METRICS = ("auc", "gauc", "conditional_auc", "logloss", "ne", "rmse", "mae", "r2", "xauc", "gxauc")
SETTING_COLUMNS = 3  # differing settings shown a column each; beyond, one column lists them row by row
Stats = dict[str, float | int | None]  # {"mean", "std", "n"} over the runs of a row
COMPARED_ON = "validation metrics at each run's best epoch (metrics.json), paired by seed"
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


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
class Pairing:
    """One row against the baseline row, over the seeds both have: the main metric and every task's own (AUC,
    RMSE: its type's default metric)."""

    seeds: list[int]  # seeds both rows have, the ones paired
    row_only: list[int]  # seeds left out: this row's without a baseline run, and the other way round
    baseline_only: list[int]
    main: Paired  # the baseline's main task and --monitor metric
    tasks: dict[str, Paired]  # each task both rows have, in its type's default metric, in the baseline's order

    def to_dict(self, baseline: Baseline) -> dict[str, Any]:
        return {"seeds": self.seeds, "left_out": {"this_row": self.row_only, "baseline": self.baseline_only},
                "main": {"task": baseline.task, "metric": baseline.metric, **_paired_dict(self.main, self.seeds)},
                "tasks": {task: _paired_dict(pair, self.seeds) for task, pair in self.tasks.items()}}


@dataclass
class Baseline:
    """`--baseline KEY=VALUE`: the row it names, and the metric the other rows are judged on."""

    setting: str  # the setting's name, underscored
    value: str  # VALUE as given
    row: int  # the baseline row's index in Comparison.rows
    task: str  # its main task
    metric: str  # its --monitor metric
    pairings: dict[int, Pairing]  # by row index, every row but the baseline's

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.metric)


@dataclass
class Comparison:
    """The rows, the settings that differ between them (the table's setting columns), a line per run
    that could not be compared, and with --baseline the rows paired with the baseline row."""

    rows: list[Row]
    columns: list[str]
    skipped: list[str] = field(default_factory=list)
    baseline: Baseline | None = None

    def to_dict(self) -> dict[str, Any]:
        rows = [row.to_dict() for row in self.rows]
        data: dict[str, Any] = {"columns": self.columns, "rows": rows, "skipped": self.skipped}
        if self.baseline is not None:
            base = self.baseline
            data["baseline"] = {
                "setting": base.setting, "value": base.value, "row": base.row, "runs": self.rows[base.row].runs,
                "task": base.task, "metric": base.metric, "higher_is_better": base.higher_is_better,
                "compared_on": COMPARED_ON, "method": METHOD,
            }
            for index, row in enumerate(rows):
                pairing = base.pairings.get(index)
                row["baseline"] = index == base.row
                row["paired"] = None if pairing is None else pairing.to_dict(base)
        return data


@dataclass
class _Run:
    path: str
    seed: int
    settings: dict[str, Any]
    metrics: dict[str, Any]
    seconds_per_epoch: float | None


def compare_runs(patterns: list[str], baseline: str | None = None) -> Comparison:
    """Read the finished runs that `patterns` (run directories or globs such as 'runs/*') name and group those
    that differ only in --seed. A run that cannot be read, or has not finished, becomes a line in `skipped`;
    MbtrainError when no run at all can be compared. `baseline`, 'KEY=VALUE' (see _baseline_row), pairs every
    other row with the row it names; MbtrainError where it names no setting, or not exactly one row."""
    key, value = _parse_baseline(baseline) if baseline is not None else (None, None)
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
    columns = [name for name in runs[0].settings if len({json.dumps(run.settings[name]) for run in runs}) > 1]
    comparison = Comparison([_row(group) for group in groups.values()], columns, skipped)
    if key is not None and value is not None:
        comparison.baseline = _pair(comparison, list(groups.values()), key, value)
    return comparison


def _parse_baseline(text: str) -> tuple[str, str]:
    """'KEY=VALUE' -> (the setting's underscored name, VALUE); MbtrainError where KEY names no compared setting."""
    name, equals, value = text.partition("=")
    key = name.strip().replace("-", "_")
    if not equals or not key:
        raise MbtrainError(f"--baseline expects KEY=VALUE, a setting and its value, e.g. balance=none: got {text!r}")
    sections = setting_sections()
    if key not in sections:
        close = difflib.get_close_matches(key, list(sections), n=1)
        hint = f"did you mean {close[0].replace('_', '-')}?" if close else "e.g. balance, lr, model, relax-factor"
        raise MbtrainError(f"--baseline {text}: {name.strip()!r} is not a setting ({hint})")
    if key in NOT_COMPARED:
        raise MbtrainError(f"--baseline {text}: {_flag(key)} is not compared (runs that differ only in "
                           f"{', '.join(map(_flag, NOT_COMPARED))} are one row); name a setting such as balance=none")
    return key, value


def _baseline_row(rows: list[Row], key: str, value: str) -> int:
    """The index of the one row whose setting `key` is `value`. Compared by the setting's type: numbers as
    floats (0.7 = .70), true/false (yes/no, on/off, 1/0) for switches, none/null (or nothing) for an unset
    setting or an empty list, lists comma-separated (purchase,click), --task-weights as task=weight pairs;
    text as it is."""
    matches = [index for index, row in enumerate(rows) if _matches(row.settings.get(key), value)]
    given = f"--baseline {_flag(key)}={value}"
    if not matches:
        present = list(dict.fromkeys(_plain(row.settings.get(key)) for row in rows))
        one_of = ", ".join(present[:-1]) + " or " + present[-1] if len(present) > 1 else present[0]
        raise MbtrainError(f"{given} matches no row: among these runs {_flag(key)} is {one_of}")
    if len(matches) > 1:
        matched = [rows[index] for index in matches]
        differ = [name for name in matched[0].settings
                  if len({json.dumps(row.settings.get(name), sort_keys=True) for row in matched}) > 1]
        labels = ", ".join(_plain_labels(rows)[index] for index in matches)
        raise MbtrainError(f"{given} matches {len(matches)} rows ({labels}), which differ in "
                           f"{', '.join(map(_flag, differ))}: name fewer runs, so that one row has {_flag(key)} "
                           f"{value}")
    return matches[0]


def _matches(setting: Any, text: str) -> bool:
    """Whether `text` spells `setting` (see _baseline_row)."""
    text = text.strip()
    if setting is None or setting == [] or setting == {}:
        return text.lower() in ("", "none", "null")
    if isinstance(setting, bool):
        return text.lower() in (TRUE if setting else FALSE)
    if isinstance(setting, int | float):
        try:
            return float(text) == float(setting)
        except ValueError:
            return False
    if isinstance(setting, list):
        parts = text.split(",")
        return len(parts) == len(setting) and all(map(_matches, setting, parts))
    if isinstance(setting, dict):
        pairs = [part.partition("=") for part in text.split(",") if part.strip()]
        given = {task.strip(): weight for task, _, weight in pairs}
        return given.keys() == setting.keys() and all(_matches(setting[task], given[task]) for task in given)
    return text == str(setting)


def _pair(comparison: Comparison, groups: list[list[_Run]], key: str, value: str) -> Baseline:
    """Every row but the baseline row against it, seed by seed: where a row holds a seed more than once, the
    seed's value is the mean of its runs'."""
    rows = comparison.rows
    index = _baseline_row(rows, key, value)
    base_runs = groups[index]
    task = rows[index].main_task
    metric = base_runs[0].metrics.get("monitor") or rows[index].settings.get("monitor") or "auc"
    base_seeds = set(rows[index].seeds)
    pairings = {}
    for other, runs in enumerate(groups):
        if other == index:
            continue
        row_seeds = set(rows[other].seeds)
        seeds = sorted(row_seeds & base_seeds)
        tasks = [name for name in rows[index].tasks if name in rows[other].tasks]
        pairings[other] = Pairing(
            seeds=seeds, row_only=sorted(row_seeds - base_seeds), baseline_only=sorted(base_seeds - row_seeds),
            main=_paired_on(runs, base_runs, seeds, task, metric),
            tasks={name: _paired_on(runs, base_runs, seeds, name, headline(rows[index].tasks[name]))
                   for name in tasks})
    adjust([pairing.main for pairing in pairings.values()])
    for name in rows[index].tasks:
        adjust([pairing.tasks[name] for pairing in pairings.values() if name in pairing.tasks])
    return Baseline(key, value, index, task, metric, pairings)


def _paired_on(runs: list[_Run], base_runs: list[_Run], seeds: list[int], task: str, metric: str) -> Paired:
    return paired(_by_seed(runs, task, metric, seeds), _by_seed(base_runs, task, metric, seeds),
                  higher_is_better=higher_is_better(metric))


def _by_seed(runs: list[_Run], task: str, metric: str, seeds: list[int]) -> list[float | None]:
    """The metric per seed (the mean over a seed's runs; None where no run of it has a finite value)."""
    values = []
    for seed in seeds:
        stats = _stats([run.metrics["tasks"].get(task, {}).get(metric) for run in runs if run.seed == seed])
        values.append(stats["mean"])
    return values


def _paired_dict(pair: Paired, seeds: list[int]) -> dict[str, Any]:
    """Paired.to_dict, saying why where nothing could be paired."""
    data = pair.to_dict()
    if pair.n == 0:
        data["verdict"] = ("nothing to pair: no seed in common with the baseline" if not seeds
                           else "nothing to pair: the metric is missing on every seed both have")
    return data


def _flag(key: str) -> str:
    return key.replace("_", "-")


def _plain(value: Any) -> str:
    """A setting's value as --baseline would spell it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(_plain, value)) if value else "none"
    if isinstance(value, dict):
        return ",".join(f"{task}={_plain(weight)}" for task, weight in value.items()) if value else "none"
    return str(value)


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
    settings = {"data": _seeds_split(paths.get("data"), flat["seed"]),
                **{k: v for k, v in flat.items() if k not in NOT_COMPARED}}
    if paths.get("valid"):  # absolute, where the flag may be relative to wherever fit ran
        settings["valid"] = _seeds_split(paths["valid"], flat["seed"])
    metrics = _load(path, "metrics.json")
    main, tasks = metrics.get("main_task"), metrics.get("tasks")
    if not (isinstance(tasks, dict) and isinstance(main, str) and main in tasks
            and all(isinstance(values, dict) for values in tasks.values())):
        raise MbtrainError(f"{path}: metrics.json is not an mbtrain metrics file (no metrics for its main task)")
    return _Run(str(path), flat["seed"], settings, metrics, seconds_per_epoch(path / "history.jsonl"))


def _seeds_split(path: str | None, seed: int) -> str | None:
    """A sweep's run reads its seed's split (SWEEP/splits/seed<k>/train.parquet): runs of the same settings on
    the seeds' splits are one row, paired by seed, so the path is named for every seed's split at once."""
    if path is None:
        return None
    file = Path(path)
    if file.parent.name == f"seed{seed}" and file.parent.parent.name == SPLITS:
        return str(file.parent.parent / "seed*" / file.name)
    return path


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


def seconds_per_epoch(history: Path) -> float | None:
    """Wall time per epoch: the rows' seconds (each row's are since the one before) over the epochs they cover
    (a row inside an epoch, --validate-every, says how far through it is). None where history.jsonl is missing
    or damaged: the metrics still compare."""
    try:
        rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        seconds = sum(row["seconds"] for row in rows)
        epochs = rows[-1]["epoch"] - 1 + rows[-1].get("progress", 1.0) if rows else 0.0
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return seconds / epochs if epochs > 0 else None


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


def comparison_table(comparison: Comparison) -> Table | Group:
    """The runs table (_runs_table); with a baseline, the paired table beneath it (_paired_table)."""
    table = _runs_table(comparison)
    if comparison.baseline is None:
        return table
    return Group(table, "", *_paired_table(comparison, comparison.baseline))


def _runs_table(comparison: Comparison) -> Table:
    """A row per Row: its run directories, the settings that differ, n (where some row averages over more than
    one run), then by task name the main task's AUC, GAUC, conditional AUC (funnels), log loss, NE (a regression
    main task's RMSE, MAE, R², XAUC, GXAUC), its --monitor metric, and the other tasks' default metric (AUC, RMSE),
    '—' where a row lacks one; best epoch and seconds per epoch. The main task is that of most rows
    (the first row's on a tie). Narrow: one space between columns, a std beneath its mean, and a cell too narrow
    for the terminal folds rather than cut a number short."""
    rows = comparison.rows
    main_task = Counter(row.main_task for row in rows).most_common(1)[0][0]
    monitors = [row.settings["monitor"] or headline(row.tasks.get(main_task, {})) for row in rows
                if row.main_task == main_task]  # without --monitor, the main task's type's default
    metric_columns = [(main_task, metric) for metric in dict.fromkeys([*MAIN_METRICS, *monitors])
                      if any(metric in row.tasks.get(main_task, {}) for row in rows)]
    metric_columns += [(task, headline(m for row in rows for m in row.tasks.get(task, {})))
                       for task in dict.fromkeys(task for row in rows for task in row.tasks) if task != main_task]
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
        table.add_column(f"{escape(task)}\n{HEADERS.get(metric, metric)}", justify="right", no_wrap=True,
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


def _paired_table(comparison: Comparison, baseline: Baseline) -> list[Table | str]:
    """Per row, against the baseline row (marked): the mean difference in the main metric with its interval,
    seeds won of those paired, the verdict in a word or two; then a line per row with seeds left out."""
    labels = _labels(comparison.rows)
    metric = f"{escape(baseline.task)} {HEADERS.get(baseline.metric, baseline.metric)}"
    given = escape(f"{_flag(baseline.setting)}={baseline.value}")
    table = Table(title=f"against the baseline, {given}: Δ {metric}, paired by seed",
                  caption=f"{COMPARED_ON}; Δ = row − baseline ({'higher' if baseline.higher_is_better else 'lower'} "
                          f"is better), [ ]: {METHOD}; won: seeds where the row did better, of those paired; the "
                          f"verdicts are adjusted for the rows compared ({ADJUSTMENT}). "
                          "--json pairs every task too, in its type's default metric (AUC, RMSE).",
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0))
    table.add_column("run", overflow="fold")
    table.add_column(f"Δ {metric}\n[95 % interval]", justify="right", overflow="fold")
    table.add_column("won", justify="right", no_wrap=True)
    table.add_column("verdict", overflow="fold")
    notes: list[Table | str] = []
    for index, label in enumerate(labels):
        pairing = baseline.pairings.get(index)
        if pairing is None:
            table.add_row(label, "baseline", "", "")
            continue
        pair = pairing.main
        table.add_row(label, _interval(pair), f"{pair.won}/{pair.n}" if pair.n else "—",
                      _verdict_word(pair, pairing.seeds))
        left_out = [f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} only {where} ({', '.join(map(str, seeds))})"
                    for seeds, where in ((pairing.row_only, "in this row"), (pairing.baseline_only, "in the baseline"))
                    if seeds]
        if left_out:
            notes.append(f"{label}: left out {' and '.join(left_out)}")
    return [table, *notes]


def _interval(pair: Paired) -> str:
    if not pair.n:
        return "—"
    if pair.low is None:
        return f"{pair.mean:+.4f}"
    return f"{pair.mean:+.4f} [{pair.low:+.4f}, {pair.high:+.4f}]"


def _verdict_word(pair: Paired, seeds: list[int]) -> str:
    """Paired.verdict, short: better, worse, no difference detected, or why there is no interval."""
    if pair.n == 0:
        return "no seed in common" if not seeds else "no values to pair"
    if pair.low is None:
        return "at least 2 seeds needed"
    verdict = pair.verdict()
    if verdict.startswith("no difference once adjusted"):
        return f"none after Holm (p {pair.adjusted_p:.3f})"
    return verdict if verdict in ("better", "worse") else "no difference detected"


def _labels(rows: list[Row]) -> list[str]:
    return [escape(label) for label in _plain_labels(rows)]


def _plain_labels(rows: list[Row]) -> list[str]:
    """A row's first run directory by name (by path where names repeat), '+k' for the row's other runs."""
    names = [Path(row.runs[0]).name for row in rows]
    if len(set(names)) < len(names):
        names = [row.runs[0] for row in rows]
    return [f"{name} +{len(row.runs) - 1}" if len(row.runs) > 1 else name
            for name, row in zip(names, rows, strict=True)]


def _setting(key: str, value: Any) -> str:
    """Lists comma-joined, dicts as task=value pairs (as --baseline spells them); data files under the working
    directory relative to it."""
    if value is None:
        return "—"
    if key in ("data", "valid") and isinstance(value, str) and Path(value).is_relative_to(Path.cwd()):
        value = str(Path(value).relative_to(Path.cwd()))
    if isinstance(value, dict):
        return escape(_plain(value))
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
