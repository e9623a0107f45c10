"""Running a sweep's fits: one after another in this process, or `--jobs N` at once in worker processes that
share the CPU threads (and, with several GPUs, take one each); and `--plan`, the same fits as `mbtrain fit`
command lines for a scheduler the user already has. A finished run is never redone; an interrupted one resumes
from its last checkpoint; a failed one is tried again and, failing, reported as failed. As soon as every run of
a method on a seed has ended, its chosen run (on validation) has its test rows scored in a worker, beside the
fits still running. Several processes may share one sweep folder: each run is claimed by one (claims.py)."""

from __future__ import annotations

import multiprocessing
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from mbtrain.checkpoint import write_text
from mbtrain.errors import first_line
from mbtrain.sweep.claims import Claims
from mbtrain.sweep.protocol import Run
from mbtrain.sweep.report import chosen, test_metrics
from mbtrain.sweep.tune import Search, take_trials

POLL = 0.5  # seconds between looks at runs other processes hold
Report = Callable[[Run, str | None, float], None]  # after each run: the run, its failure (None: finished), seconds


def threads_per_job(jobs: int, threads: int | None) -> int:
    """--threads where given, else the machine's cores shared out between the jobs."""
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def execute(runs: list[Run], jobs: int, threads: int, report: Report, claims: Claims,
            say: Callable[[str], None] = print) -> None:
    """Run every run not finished yet; `report` hears of each as it ends. `claims`: what the processes sharing the
    sweep folder hold; a run another live process holds is left to it and waited for (`say` tells of it once), one
    whose process died is taken over."""
    since = time.time()
    attempted: set[str] = set()

    def next_run() -> Run | None:
        """The next run this process may take (claimed), cleared of what a failed or unstarted attempt left."""
        for run in runs:
            if run.name in attempted or run.status() == "finished" or _failed_since(run, since):
                continue
            if not claims.take(run.name):
                continue
            if run.status() == "finished" or _failed_since(run, since):  # it ended between the look and the claim
                claims.release(run.name)
                continue
            attempted.add(run.name)
            run.failure.unlink(missing_ok=True)
            if run.status() == "pending" and run.folder.exists():  # stopped before its first epoch: start again
                shutil.rmtree(run.folder)
            return run
        return None

    def ended(run: Run, outcome: tuple[str | None, float]) -> None:
        claims.release(run.name)
        report(run, *outcome)

    said: list[bool] = []

    def others_running() -> bool:
        held = [run.name for run in runs if run.status() != "finished" and claims.busy(run.name)]
        if held and not said:
            holders = sorted({claims.holder(name) for name in held})
            say(f"waiting for {len(held)} run(s) other processes hold ({', '.join(holders)})")
            said.append(True)
        return bool(held)

    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.method, run.seed), []).append(run)
    if jobs == 1:
        _init_worker(threads, None)
        while (run := next_run()) is not None or others_running():
            if run is None:
                time.sleep(POLL)
                continue
            ended(run, _fit(_task(run)))
            for pick in _scoring(groups[run.method, run.seed], set(), since):
                test_metrics(pick)
        return
    with _pool(jobs, threads) as pool:
        running: dict[Future, Run] = {}
        asked: set[str] = set()  # runs whose scoring is under way: scored once
        scoring = [pool.submit(test_metrics, pick) for group in groups.values()
                   for pick in _scoring(group, asked, since)]
        try:
            while True:
                while len(running) < jobs and (run := next_run()) is not None:
                    running[pool.submit(_fit, _task(run))] = run
                if not running:
                    if not others_running():
                        break
                    time.sleep(POLL)
                    continue
                done, _ = wait(running, timeout=POLL, return_when=FIRST_COMPLETED)
                for future in done:
                    run = running.pop(future)
                    ended(run, future.result())
                    group = groups[run.method, run.seed]
                    scoring += [pool.submit(test_metrics, pick) for pick in _scoring(group, asked, since)]
            for future in scoring:
                future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def take_trials_in_workers(search: Search, jobs: int, threads: int) -> list[dict[str, float]]:
    """--trials with --jobs N: N worker processes, each taking trials as a process of its own would; what each
    spent on tuning and on fits."""
    search.studies()  # made once here: a new database's tables are not made safely by several processes at once
    with _pool(jobs, threads) as pool:
        workers = [pool.submit(_take_trials, search) for _ in range(jobs)]
        try:
            return [worker.result() for worker in workers]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    """`jobs` worker processes, fresh interpreters (spawned: no forked torch threads), each with its share of the
    machine (_init_worker)."""
    context = multiprocessing.get_context("spawn")
    devices = context.Queue()
    for slot in range(jobs):
        devices.put(_device_for(slot))
    return ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads, devices))


def _take_trials(search: Search) -> dict[str, float]:
    from rich.console import Console

    return take_trials(search, Console()).spent


def _failed_since(run: Run, since: float) -> bool:
    """Whether the run failed in this sweep's pass (here or in a process beside this one): not tried again."""
    try:
        return run.failure.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def _scoring(group: list[Run], asked: set[str], since: float) -> list[Run]:
    """The run whose test rows a method's runs on one seed ask to score once they have all ended in this pass
    (begun at `since`: a run that failed before it is tried again first): their chosen one, unless it is scored
    already or `asked` holds it (then it joins `asked`)."""
    if any(run.status() in ("pending", "interrupted") or run.status() == "failed" and not _failed_since(run, since)
           for run in group):
        return []
    pick = chosen(group)
    if pick is None or pick.name in asked or (pick.folder / "test_metrics.json").is_file():
        return []
    asked.add(pick.name)
    return [pick]


def plan(runs: list[Run], path: Path) -> list[Run]:
    """plan.txt: one complete `mbtrain fit` command per run not finished (a resume for an interrupted one)."""
    pending = [run for run in runs if run.status() != "finished"]
    write_text(path, "".join(" ".join(map(shlex.quote, _command(run))) + "\n" for run in pending))
    return pending


def _command(run: Run) -> list[str]:
    if run.status() == "interrupted":
        return ["mbtrain", "fit", str(run.data), "--resume", "--out", str(run.folder)]
    return ["mbtrain", "fit", str(run.data), "--config", str(run.config_file), "--out", str(run.folder)]


def _task(run: Run) -> tuple[str, str, str, bool, str]:
    return str(run.config_file), str(run.data), str(run.folder), run.status() == "interrupted", str(run.failure)


def _device_for(slot: int) -> str | None:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return str(slot % count) if count > 1 else None


def _init_worker(threads: int, devices: object) -> None:
    """A worker's share of the machine: its threads and, with several GPUs, its own."""
    device = devices.get() if devices is not None else None
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    torch.set_num_threads(threads)


def _fit(task: tuple[str, str, str, bool, str]) -> tuple[str | None, float]:
    """One run, as `mbtrain fit DATA --config FILE --out RUN [--resume]` would do it: (its failure as one line,
    written beside the runs so that the report can show it, or None when it finished; its wall seconds)."""
    from rich.console import Console

    from mbtrain.config import RunConfig, read_toml
    from mbtrain.train import fit

    config_file, data, out, resume, failure = task
    started = time.perf_counter()
    try:
        config = RunConfig().updated(read_toml(Path(config_file)))
        fit(config, Path(data), Path(out), resume=resume, console=Console(quiet=True))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 (a run that fails is a result of the sweep, not its end)
        message = f"{type(exc).__name__}: {first_line(exc)}"
        Path(failure).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(failure), message + "\n")
        print(f"mbtrain: warning: {Path(out).name} failed: {message}", file=sys.stderr)
        return message, time.perf_counter() - started
    return None, time.perf_counter() - started
