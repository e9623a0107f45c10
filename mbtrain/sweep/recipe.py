"""`mbtrain sweep`, top to bottom: read the grid, fix each seed's split, with --trials search each method's
settings on the first seed's rows (tune.py), run what is missing (or write the plan for a scheduler), then select
on validation, score the test rows of the selected runs and report."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console

from mbtrain.checkpoint import write_json
from mbtrain.errors import MbtrainError
from mbtrain.sweep import plot, tune
from mbtrain.sweep.claims import Claims, create, locked
from mbtrain.sweep.grid import Grid, read_grid
from mbtrain.sweep.protocol import (
    DEFINITION,
    Holdout,
    Run,
    Split,
    definition,
    plan_runs,
    read_definition,
    write_configs,
    write_splits,
)
from mbtrain.sweep.report import read_summary, report, summarize, write_summary
from mbtrain.sweep.runner import execute, plan, take_trials_in_workers, threads_per_job

LOCK = ".lock"  # held while a process settles the folder's definition and splits
SWEEP_ID = "sweep_id"  # a random id made with the folder: its studies' names in a storage other sweeps may share
BUDGET = "budget.json"  # --trials: each method's account of its search (tune.outcome), written once it has ended


def sweep(data: Path, arguments: list[str], config_file: Path | None, seeds: int | None, out: Path,
          holdout: Holdout, baseline: str | None, jobs: int, plan_only: bool, overwrite: bool,
          switches: dict[str, tuple[str, bool]], console: Console, trials: int | None = None,
          storage: str | None = None) -> None:
    grid = read_grid(arguments, config_file, seeds, switches, trials)
    if storage is not None and trials is None:
        raise MbtrainError("--storage holds the studies of --trials: give --trials N too")
    if trials is not None:
        tune.require_optuna()
        if plan_only:
            raise MbtrainError("--plan writes a grid's runs for a scheduler; a --trials sweep shares its work through "
                               "--storage instead: start the same command, with --storage, on each machine")
        if storage is not None:  # a storage that cannot open is one line before the sweep folder is written
            tune.check_storage(storage)
    baseline = _baseline(grid, baseline)
    holdout.check(grid.fixed.get("valid"))
    if jobs < 1:
        raise MbtrainError(f"--jobs must be at least 1: got {jobs}")
    started = time.perf_counter()
    splits = _prepare(out, data, grid, holdout, baseline, overwrite)
    timing: dict[str, Any] = {"prepare_s": time.perf_counter() - started, "run_s": {}}
    threads = threads_per_job(jobs, grid.fixed.get("threads"))
    claims = Claims.of(out)
    budget = None
    if grid.trials is not None:
        runs, budget = _search(out, data, grid, splits, storage, jobs, threads, claims, console, timing)
    else:
        runs = plan_runs(out, grid, splits)
        write_configs(runs)
    if plan_only:
        pending = plan(runs, out / "plan.txt")
        console.print(f"{out / 'plan.txt'}: {len(pending)} of {len(runs)} runs to do, one `mbtrain fit` command a "
                      f"line; then: mbtrain sweep --report {out}", soft_wrap=True)
        return
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
        execute(runs, jobs, threads, heard, claims, lambda line: console.print(line, highlight=False))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; finished runs are kept in {out}: run the same command again to finish "
                                "the rest") from None
    timing["runs_s"] = time.perf_counter() - running
    finish(out, runs, grid, baseline, console, {**timing, "jobs": jobs, "threads_per_job": threads}, budget)


def _search(out: Path, data: Path, grid: Grid, splits: dict[int, Split], storage: str | None, jobs: int,
            threads: int, claims: Claims, console: Console,
            timing: dict[str, Any]) -> tuple[list[Run], dict[str, Any]]:
    """--trials: every method's search on the first seed's rows (with the processes sharing the sweep), then its
    seed runs with the best trial's settings; the first seed's is the best trial itself, copied."""
    first = splits[grid.seeds[0]]
    search = tune.Search.of(out, storage, (out / SWEEP_ID).read_text().strip(), grid, first.train, first.valid)
    console.print(f"[bold]mbtrain sweep[/] {data}: {len(grid.methods)} methods, {grid.trials} trials each on seed "
                  f"{grid.seeds[0]}'s training and validation rows, then each method's best on seeds "
                  f"{', '.join(map(str, grid.seeds))}; {jobs} at a time, {threads} threads each; studies in "
                  f"{search.where}", soft_wrap=True, highlight=False)
    for method in grid.methods:
        searched = tune.space_line(tune.search_space(grid, method)) or "nothing (one configuration)"
        console.print(f"  {method} searches {searched}", soft_wrap=True, highlight=False, markup=False)
    started = time.perf_counter()
    try:
        spent = take_trials_in_workers(search, jobs, threads) if jobs > 1 else [tune.take_trials(search, console).spent]
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; finished trials are kept in {search.where}: run the same command again "
                                "to finish the rest") from None
    timing.update(trials_s=time.perf_counter() - started, tuning_s=sum(part["tuning_s"] for part in spent),
                  trial_fits_s=sum(part["fits_s"] for part in spent))
    budget = tune.outcome(search)
    write_json(budget, out / BUDGET)
    runs = plan_runs(out, grid, splits, _chosen(budget))
    write_configs(runs)
    for method, account in budget["methods"].items():
        if account["best_trial"] is not None:
            _copy_trial(tune.trial_folder(out, method, account["best_trial"]),
                        next(run for run in runs if run.method == method and run.seed == grid.seeds[0]), claims)
    return runs, budget


def _chosen(budget: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's settings from its best trial (a method none of whose trials completed: its defaults)."""
    return {method: account["settings"] or {} for method, account in budget["methods"].items()}


def _copy_trial(trial: Path, run: Run, claims: Claims) -> None:
    """The best trial is the first seed's run already (the same settings, rows and seed): copied, not fitted."""
    if run.status() != "pending" or not (trial / "metrics.json").is_file() or not claims.take(run.name):
        return
    if run.status() != "pending":  # another process copied it between the look and the claim
        claims.release(run.name)
        return
    staged = run.folder.with_name(f".{run.folder.name}.copy")
    for leftover in (staged, run.folder):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(trial, staged)
    staged.rename(run.folder)
    claims.release(run.name)


def report_again(out: Path, console: Console) -> None:
    """`--report SWEEP`: the summary of whatever has finished (runs a scheduler made from plan.txt included)."""
    saved = read_definition(out)
    if saved is None:
        read_summary(out)  # a clear line: not a sweep folder
        return
    grid = Grid(**saved["grid"])
    splits = write_splits(out, Path(saved["data"]), grid, Holdout.from_dict(saved))
    if grid.trials is None:
        finish(out, plan_runs(out, grid, splits), grid, saved["baseline"], console)
        return
    if not (out / BUDGET).is_file():
        raise MbtrainError(f"{out}: its trials have not all ended: run the sweep's command again to finish them")
    budget = json.loads((out / BUDGET).read_text())
    finish(out, plan_runs(out, grid, splits, _chosen(budget)), grid, saved["baseline"], console, budget=budget)


def finish(out: Path, runs: list[Run], grid: Grid, baseline: str, console: Console,
           timing: dict[str, Any] | None = None, budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """Select, score the test rows, write sweep.json (with this invocation's `timing`: what the sweep cost
    besides its runs, and with --trials each method's `budget`), print the report, draw the picture."""
    started = time.perf_counter()
    summary = summarize(runs, grid.methods, grid.seeds, baseline, Holdout.from_dict(read_definition(out)))
    if budget is not None:
        summary["budget"] = budget
        summary["selection"] = (f"per method, its best trial on seed {grid.seeds[0]}'s validation rows "
                                f"({budget['trials']} trials each), run on every seed; test rows scored once, for "
                                "those runs only")
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


def _prepare(out: Path, data: Path, grid: Grid, holdout: Holdout, baseline: str, overwrite: bool
             ) -> dict[int, Split]:
    """The sweep folder for this grid: a new one, or the same sweep's to continue; each seed's split. Every run's
    settings (with --trials, the ends of each range) are checked before anything is written."""
    saved = read_definition(out)
    if saved is not None and not grid.seeds_given:  # a sweep begun with other default seeds goes on with its own
        grid.seeds = list(saved["grid"]["seeds"])
    wanted = json.loads(json.dumps(definition(data, grid, holdout)))
    for method in grid.methods:
        configurations = grid.configurations(method) if grid.trials is None else \
            tune.corners(tune.search_space(grid, method), grid)
        for configuration in configurations:
            grid.config(method, configuration, grid.seeds[0]).validate()
    if out.exists() and not out.is_dir():
        raise MbtrainError(f"--out {out}: is a file, not a sweep folder")
    out.mkdir(parents=True, exist_ok=True)
    made = not (out / LOCK).exists()
    try:
        with locked(out / LOCK):  # processes started together on one --out: the first writes, the others then read
            return _settle(out, data, grid, holdout, baseline, overwrite, wanted)
    except MbtrainError:
        if made and out.is_dir():  # a folder refused keeps nothing of this call
            (out / LOCK).unlink(missing_ok=True)
        raise


def _settle(out: Path, data: Path, grid: Grid, holdout: Holdout, baseline: str, overwrite: bool,
            wanted: dict[str, Any]) -> dict[int, Split]:
    """The folder's definition and splits: written, or found to be this sweep's (a split is written once)."""
    saved = read_definition(out)
    differing = [] if saved is None else _differing({k: v for k, v in saved.items() if k != "baseline"}, wanted)
    fresh = not any(path.name != LOCK for path in out.iterdir())
    if not fresh and (saved is None or differing):
        if not overwrite:
            what = f"another sweep (its {', '.join(differing)} differ)" if saved is not None else \
                "files that are not a sweep"
            raise MbtrainError(f"--out {out} holds {what}: pass --overwrite to replace it, or another --out")
        for path in out.iterdir():
            if path.name != LOCK:
                path.unlink() if path.is_symlink() or not path.is_dir() else shutil.rmtree(path)
        fresh = True
    try:
        splits = write_splits(out, data, grid, holdout)
    except BaseException:
        if fresh:  # a bad split column leaves no folder that a corrected command would take for another sweep
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_json({**wanted, "baseline": baseline}, out / DEFINITION)
    create(out / SWEEP_ID, uuid.uuid4().hex[:16] + "\n")  # once: every process reads the first one's
    return splits


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
