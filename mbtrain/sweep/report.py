"""The sweep's answer: per method and seed the configuration with the best validation score (test rows never
choose), its test metrics (scored once, kept beside the run), and the paired comparison with the baseline
method: the mean difference, its 95 % interval over seeds, seeds won, and a plain verdict. sweep.json holds all
of it, every run's validation metrics and cost included; the table and the picture are read from it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table

from mbtrain.checkpoint import write_json
from mbtrain.compare import seconds_per_epoch
from mbtrain.errors import MbtrainError
from mbtrain.inference import evaluate
from mbtrain.stats import ADJUSTMENT, METHOD, adjust, mean_std, paired
from mbtrain.sweep.protocol import Holdout, Run
from mbtrain.sweep.tune import settings_text
from mbtrain.tasks import headline, higher_is_better
from mbtrain.train import monitor_score

SUMMARY = "sweep.json"
FORMAT = "mbtrain-sweep/1"


def summarize(runs: list[Run], methods: list[str], seeds: list[int], baseline: str, holdout: Holdout
              ) -> dict[str, Any]:
    """sweep.json's content from the runs as they stand (unfinished ones shown as such); `holdout`: how the
    rows were held out, which says what the intervals speak for."""
    config = runs[0].config
    tasks = config.ordered_tasks
    records = [_record(run) for run in runs]
    metric = config.train.monitor or next((r["monitor"] for r in records if r.get("monitor")), "auc")
    metrics = task_metrics(records, tasks, metric)
    by_name = {record["name"]: record for record in records}
    for method in methods:
        for seed in seeds:
            pick = chosen([run for run in runs if run.method == method and run.seed == seed])
            if pick is not None:
                by_name[pick.name]["selected"] = True
                by_name[pick.name]["test"] = test_metrics(pick)
    summary = {"format": FORMAT, "tasks": tasks, "main_task": tasks[0], "metric": metric,
               "higher_is_better": higher_is_better(metric), "task_metrics": metrics,
               "task_higher_is_better": {task: higher_is_better(name) for task, name in metrics.items()},
               "baseline": baseline, "seeds": seeds, "split": _split(holdout),
               "interval": METHOD, "selection": f"per method and seed, the configuration with the best main-task "
               f"validation {metric}; test rows scored once, for the selected runs only",
               "methods": _adjusted({method: _method(method, records, metrics, seeds, baseline)
                                     for method in methods}, tasks),
               "runs": records}
    summary["warnings"] = _warnings(summary)
    return summary


def _split(holdout: Holdout) -> dict[str, Any]:
    if holdout.time_column:
        return {"by": "time", "column": holdout.time_column,
                "note": f"one split by {holdout.time_column} that every seed shares: the intervals speak for the "
                        "seeds' initialisation and row order, not for the choice of rows"}
    if holdout.group_column:
        return {"by": "group", "column": holdout.group_column}
    return {"by": "row"}


def task_metrics(records: list[dict[str, Any]], tasks: list[str], metric: str) -> dict[str, str]:
    """The test metric each task is reported in: the main task's --monitor `metric`; another task's the same where
    its type has it (a binary task beside a binary main task), else its type's default (RMSE for a regression
    task beside a binary main task, AUC for a binary one beside a regression main task), read from the metrics
    the finished runs hold for it."""
    chosen = {tasks[0]: metric}
    for task in tasks[1:]:
        names = next((record["valid"][task] for record in records if task in (record["valid"] or {})), None)
        chosen[task] = metric if names is None or metric in names else headline(names)
    return chosen


def _record(run: Run) -> dict[str, Any]:
    status = run.status()
    record: dict[str, Any] = {"name": run.name, "method": run.method, "configuration": run.configuration,
                              "settings": run.settings, "seed": run.seed, "status": status, "folder": str(run.folder),
                              "selected": False, "valid": None, "test": None, "best_epoch": None,
                              "seconds": None, "epoch_seconds": None}
    if status == "failed":
        record["error"] = run.failure.read_text().strip()
    if status != "finished":
        return record
    metrics = json.loads((run.folder / "metrics.json").read_text())
    record.update(valid=metrics["tasks"], best_epoch=metrics["best_epoch"], seconds=metrics["seconds"],
                  monitor=metrics["monitor"],
                  epoch_seconds=seconds_per_epoch(run.folder / "history.jsonl"))
    return record


def chosen(group: list[Run]) -> Run | None:
    """Of one method's runs on one seed, the finished one with the best main-task validation score (--monitor, as
    fit picks its best epoch); a tie goes to the earlier configuration. Validation metrics only."""
    scored = []
    for run in group:
        if run.status() == "finished":
            metrics = json.loads((run.folder / "metrics.json").read_text())
            scored.append((monitor_score(metrics["tasks"][metrics["main_task"]], metrics["monitor"]),
                           -run.configuration, run))
    return max(scored, key=lambda item: item[:2])[2] if scored else None


def test_metrics(run: Run) -> dict[str, Any]:
    """The selected run's best checkpoint on the test rows, scored once and kept as RUN/test_metrics.json."""
    path = run.folder / "test_metrics.json"
    if path.is_file():
        return json.loads(path.read_text())["tasks"]
    metrics = evaluate(run.folder, run.test, run.config.data.group_by)
    write_json(metrics, path)
    return metrics["tasks"]


def _method(method: str, records: list[dict[str, Any]], metrics: dict[str, str], seeds: list[int],
            baseline: str) -> dict[str, Any]:
    """One method's block of sweep.json; `metrics` maps each task (main task first) to its metric."""
    tasks = list(metrics)
    mine = [r for r in records if r["method"] == method]
    chosen = {seed: next((r for r in mine if r["seed"] == seed and r["selected"]), None) for seed in seeds}
    theirs = {seed: next((r for r in records if r["method"] == baseline and r["seed"] == seed and r["selected"]),
                         None) for seed in seeds}

    def test_values(picked: dict[int, dict[str, Any] | None], task: str) -> list[float | None]:
        return [None if r is None else r["test"][task].get(metrics[task]) for r in (picked[seed] for seed in seeds)]

    block: dict[str, Any] = {
        "configurations": len({r["configuration"] for r in mine}),
        "runs": len(mine),
        "finished": sum(r["status"] == "finished" for r in mine),
        "failed": [r["name"] for r in mine if r["status"] == "failed"],
        "unfinished": [r["name"] for r in mine if r["status"] in ("pending", "interrupted")],
        "chosen": {str(seed): None if r is None else {"run": r["name"], "settings": r["settings"]}
                   for seed, r in chosen.items()},
        "test": {task: dict(zip(("mean", "std", "n"), mean_std(test_values(chosen, task)), strict=True))
                 for task in tasks},
        "seconds": sum(r["seconds"] or 0.0 for r in mine),
    }
    if method != baseline:
        block["paired"] = {task: paired(test_values(chosen, task), test_values(theirs, task),
                                        higher_is_better(metrics[task])) for task in tasks}
        ratios = [r["epoch_seconds"] / b["epoch_seconds"] for r, b in ((chosen[s], theirs[s]) for s in seeds)
                  if r is not None and b is not None and r["epoch_seconds"] and b["epoch_seconds"]]
        block["epoch_time_ratio"] = statistics.median(ratios) if ratios else None
        base_seconds = sum(r["seconds"] or 0.0 for r in records if r["method"] == baseline)
        finished = block["finished"] and base_seconds  # a method whose every run failed took no comparable time
        block["total_time_ratio"] = block["seconds"] / base_seconds if finished else None
    return block


def _adjusted(blocks: dict[str, dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """The blocks with each task's paired tests (stats.Paired) adjusted for the methods compared with the
    baseline (stats.adjust), as JSON."""
    compared = [block for block in blocks.values() if "paired" in block]
    for task in tasks:
        adjust([block["paired"][task] for block in compared])
    for block in compared:
        block["paired"] = {task: pair.to_dict() for task, pair in block["paired"].items()}
    return blocks


def _warnings(summary: dict[str, Any]) -> list[str]:
    notes = []
    budgets = {method: block["configurations"] for method, block in summary["methods"].items()}
    if len(set(budgets.values())) > 1:
        counts = ", ".join(f"{method} {count}" for method, count in budgets.items())
        notes.append(f"the methods were tuned on unequal budgets ({counts} configurations): a method with more "
                     "configurations had more chances on validation; equal budgets are the fair comparison")
    for method, block in summary["methods"].items():
        for name in block["failed"]:
            notes.append(f"{name} failed: {next(r['error'] for r in summary['runs'] if r['name'] == name)}")
        if block["unfinished"]:
            notes.append(f"{method}: {len(block['unfinished'])} run(s) not finished; the figures leave them out")
    return notes


def write_summary(summary: dict[str, Any], folder: Path) -> Path:
    path = folder / SUMMARY
    write_json(summary, path)
    return path


def read_summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY
    if not path.is_file():
        raise MbtrainError(f"{folder}: no {SUMMARY} (not a sweep folder, or no run has finished yet)")
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        raise MbtrainError(f"{path}: not valid JSON") from None
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise MbtrainError(f"{path}: not an mbtrain sweep summary")
    return summary


def report(summary: dict[str, Any]) -> Group:
    """Per method the main task's test metric (mean ± std over seeds), its paired difference to the baseline with
    the 95 % interval and seeds won, time over the baseline's; the auxiliary tasks' differences likewise; a verdict
    line per method; the configurations chosen; the warnings. Narrow enough for an 80-column terminal."""
    tasks, metric, baseline = summary["tasks"], summary["metric"], summary["baseline"]
    metrics = summary.get("task_metrics") or dict.fromkeys(tasks, metric)  # a sweep.json of before task types
    methods = summary["methods"]
    table = _table(f"test {metric} of {tasks[0]} (main) · {len(summary['seeds'])} seeds · Δ against {baseline}, "
                   f"paired by seed", ("method (k)", f"test {metric}", "Δ", "95 % interval", "Holm p",
                                       "won"))
    # the auxiliary tasks: a table per metric they are reported in (AUC for binary tasks, RMSE for regression ones)
    auxiliary = {name: _table(f"auxiliary tasks' test {name}: Δ against {baseline}",
                              ("method", "task", f"test {name}", "Δ", "95 % interval", "Holm p", "won"))
                 for name in dict.fromkeys(metrics[task] for task in tasks[1:])}
    budget = summary.get("budget")  # --trials: each method's search
    lines = []
    for method, block in methods.items():
        name = f"{method} ({budget['trials'] if budget else block['configurations']})"
        if method == baseline:
            table.add_row(name, _mean_std(block["test"][tasks[0]]), "", "baseline", "", "")
            continue
        pair = block["paired"][tasks[0]]
        table.add_row(name, _mean_std(block["test"][tasks[0]]), *_paired(pair))
        for task in tasks[1:]:
            auxiliary[metrics[task]].add_row(method, task, _mean_std(block["test"][task]),
                                             *_paired(block["paired"][task]))
        lines.append(f"{method} against {baseline} on {tasks[0]}: {pair['verdict']}; time ×"
                     f"{_ratio(block['epoch_time_ratio'])} an epoch, ×{_ratio(block['total_time_ratio'])} all runs")
    chosen = [f"  {method}: " + "; ".join(f"seed {seed} {_settings(pick)}" for seed, pick in block["chosen"].items())
              for method, block in methods.items() if block["configurations"] > 1 and not budget]
    lower = list(dict.fromkeys(name for name in metrics.values() if not higher_is_better(name)))
    direction = f" ({', '.join(lower)}: lower is better)" if lower else ""
    counted = "the trials each method was tuned on" if budget else "the method's configurations"
    caption = (f"(k): {counted}; Δ: method − baseline{direction}; [ ]: {summary['interval']}; "
               f"Holm p: the paired t-test's p-value adjusted for the methods compared ({ADJUSTMENT}), which the "
               f"verdicts read; time ×: the method's epoch time and all its runs' time over the baseline's; "
               f"{summary['selection']}.")
    notes = [f"warning: {note}" for note in summary["warnings"]]
    split = summary.get("split") or {}  # a sweep.json of before the split flags: by row
    if split.get("note"):
        notes.insert(0, f"note: {split['note']}")
    searched = _budget(budget, metric, summary["seeds"][0]) if budget else []
    return Group(*searched, table, *(auxiliary.values() if len(methods) > 1 else []), caption, *lines,
                 *(["chosen on validation:", *chosen] if chosen else []), *notes)


def _budget(budget: dict[str, Any], metric: str, seed: int) -> list[Any]:
    """--trials: each method's search (trials completed, pruned, failed; its best validation score and the trial
    that found it; that trial's settings), and a note where the best came late in the budget."""
    trials = budget["trials"]
    table = _table(f"tuning: {trials} trials per method on seed {seed}'s validation rows (Optuna TPE, median "
                   "pruner)", ("method", "done", "pruned", "failed", f"best valid {metric}", "at trial"))
    lines, late = [], []
    for method, account in budget["methods"].items():
        best = account["best_trial"]
        value = "—" if account["best_value"] is None else f"{account['best_value']:.4f}"
        table.add_row(method, str(account["completed"]), str(account["pruned"]), str(account["failed"]), value,
                      "—" if best is None else f"{best + 1}/{trials}")
        lines.append(f"  {method}: " + (settings_text(account["settings"]) or "nothing searched" if best is not None
                                        else "no trial completed: its defaults"))
        if best is not None and trials >= 4 and best + 1 > trials * 3 // 4:
            late.append(method)
    notes = [f"note: the best trial came in the last quarter of the budget for {', '.join(late)}: more --trials may "
             "find better settings"] if late else []
    return [table, "chosen by the search (each method's best trial, run on every seed):", *lines, *notes]


def _table(title: str, headings: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                  padding=(0, 1, 0, 0))
    for heading in headings:
        table.add_column(heading, justify="left" if heading.startswith(("method", "task")) else "right",
                         no_wrap=True)
    return table


def _paired(pair: dict[str, Any]) -> tuple[str, str, str, str]:
    """(Δ, its interval, its Holm-adjusted p-value, seeds won) cells."""
    if not pair["n"]:
        return "—", "", "", "0/0"
    interval = "" if pair["low"] is None else f"[{pair['low']:+.4f}, {pair['high']:+.4f}]"
    adjusted = pair.get("adjusted_p")  # a sweep.json of before the adjustment has none
    return (f"{pair['mean']:+.4f}", interval, "" if adjusted is None else f"{adjusted:.3f}",
            f"{pair['won']}/{pair['n']}")


def _mean_std(values: dict[str, Any]) -> str:
    if values["mean"] is None:
        return "—"
    spread = f"±{values['std']:.4f}" if values["std"] is not None else ""
    return f"{values['mean']:.4f}{spread}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _settings(pick: dict[str, Any] | None) -> str:
    if pick is None:
        return "failed"
    return settings_text(pick["settings"]) or pick["run"]
