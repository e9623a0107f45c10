"""`mbtrain sweep`, top to bottom: read the grid, fix each seed's split, run what is missing (or write the plan
for a scheduler), then select on validation, score the test rows of the selected runs and report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from mbtrain.checkpoint import write_json
from mbtrain.errors import MbtrainError
from mbtrain.sweep import plot
from mbtrain.sweep.grid import Grid, read_grid
from mbtrain.sweep.protocol import (
    DEFINITION,
    Holdout,
    Run,
    definition,
    plan_runs,
    read_definition,
    write_configs,
    write_splits,
)
from mbtrain.sweep.report import read_summary, report, summarize, write_summary
from mbtrain.sweep.runner import execute, plan, threads_per_job


def sweep(data: Path, arguments: list[str], config_file: Path | None, seeds: int | None, out: Path,
          holdout: Holdout, baseline: str | None, jobs: int, plan_only: bool, overwrite: bool,
          switches: dict[str, tuple[str, bool]], console: Console) -> None:
    grid = read_grid(arguments, config_file, seeds, switches)
    baseline = _baseline(grid, baseline)
    holdout.check(grid.fixed.get("valid"))
    if jobs < 1:
        raise MbtrainError(f"--jobs must be at least 1: got {jobs}")
    started = time.perf_counter()
    runs = _prepare(out, data, grid, holdout, baseline, overwrite)
    timing: dict[str, Any] = {"prepare_s": time.perf_counter() - started, "run_s": {}}
    if plan_only:
        pending = plan(runs, out / "plan.txt")
        console.print(f"{out / 'plan.txt'}: {len(pending)} of {len(runs)} runs to do, one `mbtrain fit` command a "
                      f"line; then: mbtrain sweep --report {out}", soft_wrap=True)
        return
    threads = threads_per_job(jobs, grid.fixed.get("threads"))
    done = sum(run.status() == "finished" for run in runs)
    console.print(f"[bold]mbtrain sweep[/] {data}: {len(grid.methods)} methods, {len(runs)} runs "
                  f"({done} done), seeds {', '.join(map(str, grid.seeds))}; {jobs} at a time, {threads} threads each; "
                  f"{out}", soft_wrap=True)
    finished = [done]

    def heard(run: Run, failure: str | None, seconds: float) -> None:
        finished[0] += 1
        timing["run_s"][run.name] = round(seconds, 3)
        outcome = f"failed: {failure}" if failure else _valid(run)
        console.print(f"[{finished[0]}/{len(runs)}] {run.name}: {outcome}", soft_wrap=True)

    running = time.perf_counter()
    try:
        execute(runs, jobs, threads, heard)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; finished runs are kept in {out}: run the same command again to finish "
                                "the rest") from None
    timing["runs_s"] = time.perf_counter() - running
    finish(out, runs, grid, baseline, console, {**timing, "jobs": jobs, "threads_per_job": threads})


def report_again(out: Path, console: Console) -> None:
    """`--report SWEEP`: the summary of whatever has finished (runs a scheduler made from plan.txt included)."""
    saved = read_definition(out)
    if saved is None:
        read_summary(out)  # a clear line: not a sweep folder
        return
    grid = Grid(**saved["grid"])
    runs = plan_runs(out, grid, write_splits(out, Path(saved["data"]), grid, Holdout.from_dict(saved)))
    finish(out, runs, grid, saved["baseline"], console)


def finish(out: Path, runs: list[Run], grid: Grid, baseline: str, console: Console,
           timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Select, score the test rows, write sweep.json (with this invocation's `timing`: what the sweep cost
    besides its runs), print the report, draw the picture."""
    started = time.perf_counter()
    summary = summarize(runs, grid.methods, grid.seeds, baseline, Holdout.from_dict(read_definition(out)))
    summary["timing"] = {**(timing or {}), "select_and_score_s": time.perf_counter() - started}
    write_summary(summary, out)
    console.print(report(summary), soft_wrap=True)
    if plot.have_matplotlib():
        pictures = plot.write_picture(summary, out)
        console.print(f"picture: {', '.join(map(str, pictures))}")
    else:
        console.print(f"the picture (sweep.png) needs matplotlib: {plot.INSTALL}", markup=False)
    return summary


def _baseline(grid: Grid, baseline: str | None) -> str:
    baseline = baseline or grid.methods[0]
    if baseline not in grid.methods:
        raise MbtrainError(f"--baseline {baseline!r} is not one of --balance ({', '.join(grid.methods)})")
    if len(grid.methods) > 1 and len(grid.seeds) < 2:
        raise MbtrainError("comparing methods needs at least 2 seeds for an interval: give --seeds 2 or more")
    return baseline


def _prepare(out: Path, data: Path, grid: Grid, holdout: Holdout, baseline: str, overwrite: bool) -> list[Run]:
    """The sweep folder for this grid: a new one, or the same sweep's to continue; each seed's split, each run's
    settings. Every run's settings are checked before anything is written."""
    saved = read_definition(out)
    if saved is not None and not grid.seeds_given:  # a sweep begun with other default seeds goes on with its own
        grid.seeds = list(saved["grid"]["seeds"])
    wanted = json.loads(json.dumps(definition(data, grid, holdout)))
    for method in grid.methods:
        for configuration in grid.configurations(method):
            grid.config(method, configuration, grid.seeds[0]).validate()
    differing = [] if saved is None else _differing({k: v for k, v in saved.items() if k != "baseline"}, wanted)
    if out.exists() and any(out.iterdir()) and (saved is None or differing):
        if not overwrite:
            what = f"another sweep (its {', '.join(differing)} differ)" if saved is not None else \
                "files that are not a sweep"
            raise MbtrainError(f"--out {out} holds {what}: pass --overwrite to replace it, or another --out")
        shutil.rmtree(out)
    fresh = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    try:
        splits = write_splits(out, data, grid, holdout)
    except BaseException:
        if fresh:  # a bad split column leaves no folder that a corrected command would take for another sweep
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_json({**wanted, "baseline": baseline}, out / DEFINITION)
    runs = plan_runs(out, grid, splits)
    write_configs(runs)
    return runs


def _differing(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The definition's keys (the grid's, by its parts) whose values differ."""
    keys = [key for key in {**saved, **wanted} if key != "grid" and saved.get(key) != wanted.get(key)]
    grids = saved.get("grid", {}), wanted.get("grid", {})
    return keys + [f"grid {part}" for part in {**grids[0], **grids[1]} if grids[0].get(part) != grids[1].get(part)]


def _valid(run: Run) -> str:
    metrics = json.loads((run.folder / "metrics.json").read_text())
    monitor = metrics.get("monitor", "auc")
    value = metrics["tasks"][metrics["main_task"]].get(monitor)
    return f"{monitor} {value:.4f} on validation" if value is not None else f"{monitor} undefined on validation"
