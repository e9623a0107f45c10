"""mbtrain sweep --trials: each method's search on equal budgets (Optuna), ranges, the default spaces, the budget's
account, several processes sharing one sweep, an interrupted search, the pruner's hook, bad input."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mbtrain.config import RunConfig, from_run_record
from mbtrain.space import Range
from mbtrain.sweep.claims import Claims
from mbtrain.sweep.grid import read_grid
from mbtrain.sweep.tune import search_space
from mbtrain.train import fit
from tests.helpers import make_frame, run_cli

COMMON = ["--tasks", "purchase,click", "--epochs", "2", "--batch-size", "64", "--threads", "1", "--patience", "0"]
TRIAL_LINE = re.compile(r"^trial (\d+)/(\d+) of (\S+):", re.M)
RUN_LINE = re.compile(r"^\[\d+/\d+\] (\S+):", re.M)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tune-data") / "train.parquet"
    make_frame(600, seed=0).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def tuned(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tuned") / "sweep"
    result = run_cli("sweep", str(data), *COMMON, "--balance", "none,metabalance", "--trials", "3", "--seeds", "2",
                     "--relax-factor", "0.5:0.9", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


def _trials(output: str) -> list[tuple[str, int]]:
    return [(method, int(number)) for number, _, method in TRIAL_LINE.findall(output)]


def test_every_method_gets_exactly_its_trials_and_its_best_runs_on_every_seed(tuned: tuple[Path, str]) -> None:
    out, output = tuned
    assert sorted(_trials(output)) == [(m, n) for m in ("metabalance", "none") for n in (1, 2, 3)]
    budget = json.loads((out / "budget.json").read_text())
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["budget"] == budget
    for method, account in budget["methods"].items():
        assert account["completed"] + account["pruned"] + account["failed"] == 3 and account["running"] == 0
        assert len(account["curve"]) == 3
        best = out / "trials" / method / f"{account['best_trial']:03d}"
        assert json.loads((best / "metrics.json").read_text())["tasks"]["purchase"]["auc"] == account["best_value"]
        assert account["curve"][-1] == account["best_value"] == max(v for v in account["curve"] if v is not None)
        for seed in (0, 1):  # the best trial's settings, on every seed
            record = json.loads((out / "runs" / f"{method}-0-seed{seed}" / "config.json").read_text())
            config = from_run_record(record)[0].flat()
            for name, value in account["settings"].items():
                assert config[name] == value, (method, name)
    # the first seed's run is the best trial itself (its rows, its seed): copied, not fitted again
    first = out / "runs" / "metabalance-0-seed0"
    best = out / "trials" / "metabalance" / f"{budget['methods']['metabalance']['best_trial']:03d}"
    assert (first / "history.jsonl").read_text() == (best / "history.jsonl").read_text()
    assert {run: RUN_LINE.findall(output).count(run) for run in RUN_LINE.findall(output)} == {
        "none-0-seed1": 1, "metabalance-0-seed1": 1}


def test_each_method_searches_its_own_settings_and_the_ranges_given(tuned: tuple[Path, str]) -> None:
    out, output = tuned
    budget = json.loads((out / "budget.json").read_text())
    none, meta = (budget["methods"][m]["settings"] for m in ("none", "metabalance"))
    assert set(none) == {"lr", "task_weights"} and set(none["task_weights"]) == {"click"}
    assert set(meta) == {"lr", "task_weights", "relax_factor", "beta", "strategy"}
    assert 0.5 <= meta["relax_factor"] <= 0.9
    first = dict(re.findall(r"^trial 1/3 of (\S+): .*\((lr [^,]+, task_weights.click [^,)]+)", output, re.M))
    assert first["none"] == first["metabalance"]  # trial k of every method draws the settings they share alike
    assert "metabalance searches lr 6.25e-05:0.001875:log, task_weights.click 0.05:1:log, beta 0.5:0.99, strategy " \
        "both|reduce|enlarge, relax_factor 0.5:0.9" in output
    report = run_cli("sweep", "--report", str(out))
    assert report.exit_code == 0 and "tuning: 3 trials per method" in report.output


def test_the_default_spaces() -> None:
    def space(*flags: str) -> dict[str, Any]:
        grid = read_grid(["--tasks", "purchase,cart,click", "--balance", "none,metabalance,famo,pcgrad", *flags],
                         None, None, {}, trials=4)
        return {method: search_space(grid, method) for method in grid.methods}

    spaces = space()
    assert spaces["none"] == {"lr": Range(0.001, 0.03, log=True), "task_weights.cart": Range(0.05, 1.0, log=True),
                              "task_weights.click": Range(0.05, 1.0, log=True)}
    assert set(spaces["metabalance"]) == {*spaces["none"], "relax_factor", "beta", "strategy"}
    assert set(spaces["famo"]) == {"lr", "famo_lr", "famo_decay"}  # it ignores task weights
    given = space("--lr", "0.01", "--relax-factor", "0.4:0.6", "--hidden", "32", "64,32")
    assert "lr" not in given["none"] and "relax_factor" not in given["none"]
    assert given["metabalance"]["relax_factor"] == Range(0.4, 0.6) and given["pcgrad"]["hidden"] == ([32], [64, 32])
    weights = space("--task-weights", "click=0.1:0.5,cart=0.3")
    assert weights["none"] == {"lr": Range(0.001, 0.03, log=True), "task_weights.click": Range(0.1, 0.5)}


def test_ranges_in_a_toml_file_read_as_on_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "sweep.toml"
    config.write_text('tasks = "purchase,cart,click"\nbalance = ["none", "metabalance"]\nlr = "0.001:0.03:log"\n'
                      'task-weights = "cart=0.05:1:log,click=0.3"\nrelax-factor = "0.3:0.95"\n'
                      'nash-update-weights-every = "1:50:log"\n')
    grid = read_grid([], config, None, {}, trials=4)
    assert grid.ranges == {"lr": Range(0.001, 0.03, log=True), "task_weights.cart": Range(0.05, 1.0, log=True),
                           "relax_factor": Range(0.3, 0.95),
                           "nash_update_weights_every": Range(1, 50, log=True, integer=True)}
    assert grid.fixed["task_weights"] == {"click": 0.3}
    assert search_space(grid, "none") == {"lr": Range(0.001, 0.03, log=True),
                                          "task_weights.cart": Range(0.05, 1.0, log=True)}


def test_two_processes_share_one_sweep_and_run_nothing_twice(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "mbtrain", "sweep", str(data), "--tasks", "purchase,click", "--epochs", "1",
               "--batch-size", "64", "--threads", "1", "--balance", "none,metabalance", "--trials", "3", "--seeds", "2",
               "--out", str(out), "--storage", str(tmp_path / "studies.journal")]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [process.communicate(timeout=240)[0] for process in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    trials = _trials(outputs[0]) + _trials(outputs[1])
    assert sorted(trials) == [(m, n) for m in ("metabalance", "none") for n in (1, 2, 3)], outputs
    assert _trials(outputs[0]) and _trials(outputs[1]), outputs  # both took trials
    runs = RUN_LINE.findall(outputs[0]) + RUN_LINE.findall(outputs[1])
    assert sorted(runs) == ["metabalance-0-seed1", "none-0-seed1"], outputs
    budget = json.loads((out / "budget.json").read_text())
    assert all(a["completed"] + a["pruned"] + a["failed"] == 3 for a in budget["methods"].values())
    assert not (out / "study.journal").exists()  # the --storage given
    assert all("test auc of purchase" in output for output in outputs)  # each wrote the report


def test_an_interrupted_search_keeps_every_finished_trial(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    flags = [*COMMON, "--balance", "none", "--trials", "3", "--seeds", "2", "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "mbtrain", "sweep", str(data), *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    for line in process.stdout:  # killed at once after its first trial: the second is under way or about to be
        seen += line
        if line.startswith("trial 1/3"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert "trial 1/3" in seen, seen
    kept = out / "trials" / "none" / "000" / "metrics.json"
    written = kept.stat().st_mtime_ns
    result = run_cli("sweep", str(data), *flags)
    assert result.exit_code == 0, result.output
    assert sorted(n for _, n in _trials(result.output)) == [2, 3]  # trial 1 kept, the killed one taken over
    assert kept.stat().st_mtime_ns == written
    account = json.loads((out / "budget.json").read_text())["methods"]["none"]
    assert account["completed"] + account["pruned"] + account["failed"] == 3


def test_a_claim_is_one_live_process_s_and_a_dead_one_s_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from mbtrain.sweep.claims import Claims; "
         f"Claims(Path({str(tmp_path)!r})).take('run-b'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    mine = Claims(tmp_path)
    assert mine.take("run-a") and mine.take("run-a")
    assert not mine.take("run-b") and mine.busy("run-b")  # a live process's
    holder.send_signal(signal.SIGSTOP)  # stopped (Ctrl-Z), not dead: still its
    assert not mine.take("run-b")
    holder.kill()
    holder.wait()
    assert not mine.busy("run-b") and mine.take("run-b")  # its process is gone: taken over
    (tmp_path / "run-c.claim").write_text(json.dumps({**mine.me, "token": "a dead process's that had this pid"}))
    assert mine.take("run-c")  # this process's number, yet not its claim: a container restarted with the same pid
    mine.release("run-a")
    assert not (tmp_path / "run-a.claim").exists() and (tmp_path / "run-b.claim").exists()


def test_fit_stops_where_on_validation_says(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    make_frame(300, seed=2).write_parquet(path)
    config = RunConfig().updated({"tasks": ["purchase", "click"], "epochs": 4, "batch_size": 64, "threads": 1})
    heard: list[tuple[int, float]] = []

    def prune_at_second(entry: dict[str, Any], score: float) -> bool:
        heard.append((entry["epoch"], score))
        return len(heard) == 2

    torch.manual_seed(0)
    metrics = fit(config, path, tmp_path / "run", on_validation=prune_at_second)
    assert [epoch for epoch, _ in heard] == [1, 2] and metrics["epochs_run"] == 2 and metrics["stopped_early"]
    assert heard[0][1] == pytest.approx(
        json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[0])["valid"]["purchase"]["auc"])


@pytest.mark.parametrize(("arguments", "message"), [
    (["--lr", "0.001:0.03:log"], "--lr 0.001:0.03:log is a range, which --trials N searches"),
    (["--trials", "3", "--lr", "0.03:0.001"], "--lr: 0.03:0.001: the low end should be below the high end"),
    (["--trials", "3", "--lr", "0:1:log"], "a log range starts above 0"),
    (["--trials", "3", "--lr", "0.001:0.01", "0.1"], "--lr: a range is searched on its own"),
    (["--trials", "3", "--task-weights", "click=x:1"], "a range's ends should be numbers"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--storage", "x.journal"], "--storage holds the studies of --trials: give --trials N too"),
    (["--trials", "3", "--plan"], "--plan writes a grid's runs"),
    (["--trials", "3", "--relax-factor", "0.5:1.5"], "--relax-factor must be in [0, 1)"),
    (["--trials", "3", "--seed", "0:4"], "--seed takes the sweep's seeds, not a range"),
    (["--trials", "3", "--valid-fraction", "0.1:0.3"], "--valid-fraction takes one value in a sweep"),
    (["--trials", "3", "--storage", "/dev/null/studies.journal"], "--storage /dev/null/studies.journal:"),
    (["--trials", "3", "--storage", "postgresql://nobody@nowhere/db"], "--storage postgresql://nobody@nowhere/db:"),
    (["--trials", "3", "--storage", "sqlite:////dev/null/x.db"], "--storage /dev/null/x.db: /dev/null is not a folder"),
])
def test_bad_input_is_one_line(arguments: list[str], message: str, data: Path, tmp_path: Path) -> None:
    result = run_cli("sweep", str(data), "--tasks", "purchase,click", "--balance", "none,metabalance", *arguments,
                     "--out", str(tmp_path / "s"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "s").exists()


def test_a_range_in_a_methods_own_table_is_one_line(data: Path, tmp_path: Path) -> None:
    config = tmp_path / "grid.toml"
    config.write_text('tasks = "purchase,click"\n[method.tuned]\nbalance = "none"\nlr = "0.001:0.01:log"\n')
    result = run_cli("sweep", str(data), "--config", str(config), "--trials", "2", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2 and "method.tuned: lr is a range" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_without_optuna_trials_is_one_line_naming_the_extra(data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    result = run_cli("sweep", str(data), "--tasks", "purchase,click", "--trials", "3", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2
    assert "mbtrain[tune]" in result.stderr and len(result.stderr.strip().splitlines()) == 1
