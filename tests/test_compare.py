"""`mbtrain compare` end to end: tiny runs made with `mbtrain fit`, compared through the CLI."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from tests.helpers import make_frame, run_cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/none-s{0,1,2}: the same settings but --seed; runs/meta: --balance metabalance; runs/click-only:
    another task set."""
    folder = tmp_path_factory.mktemp("sweep")
    data = folder / "train.parquet"
    make_frame(300).write_parquet(data)
    runs = folder / "runs"
    fits = {f"none-s{seed}": ["--seed", str(seed)] for seed in range(3)}
    fits["meta"] = ["--balance", "metabalance"]
    fits["click-only"] = ["--tasks", "click"]
    for name, flags in fits.items():
        result = run_cli("fit", str(data), "--tasks", "purchase,click", "--epochs", "2", "--batch-size", "64",
                         "--out", str(runs / name), "--threads", "1", *flags)
        assert result.exit_code == 0, result.output
    return runs


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def edit_json(path: Path, edit) -> None:
    raw = read_json(path)
    edit(raw)
    path.write_text(json.dumps(raw))


def compare(*args: str, json_path: Path) -> tuple[dict, str, str]:
    result = run_cli("compare", *args, "--json", str(json_path))
    assert result.exit_code == 0, result.output
    return read_json(json_path), result.stdout, result.stderr


def test_runs_that_differ_only_in_seed_are_one_row(sweep: Path, tmp_path: Path) -> None:
    seeds = [sweep / f"none-s{seed}" for seed in range(3)]
    comparison, stdout, stderr = compare(*map(str, seeds), json_path=tmp_path / "compare.json")
    assert stderr == ""
    assert comparison["columns"] == [] and comparison["skipped"] == []
    [row] = comparison["rows"]
    assert set(row) == {"runs", "n", "seeds", "settings", "main_task", "tasks", "best_epoch", "epochs_run",
                        "seconds_per_epoch"}
    assert row["settings"]["data"] == str((sweep.parent / "train.parquet").resolve())
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2] and row["runs"] == list(map(str, seeds))
    assert row["main_task"] == "purchase" and row["settings"]["balance"] == "none"
    metrics = [read_json(run / "metrics.json") for run in seeds]
    for task in ("purchase", "click"):
        for metric in ("auc", "logloss", "pr_auc", "calibration", "ne", "positives"):
            values = [m["tasks"][task][metric] for m in metrics]
            stats = row["tasks"][task][metric]
            assert stats["mean"] == pytest.approx(statistics.fmean(values))
            assert stats["std"] == pytest.approx(statistics.stdev(values))  # sample std, n - 1
            assert stats["n"] == 3
    assert row["best_epoch"]["mean"] == pytest.approx(statistics.fmean(m["best_epoch"] for m in metrics))
    histories = [(run / "history.jsonl").read_text().splitlines() for run in seeds]
    per_run = [statistics.fmean(json.loads(line)["seconds"] for line in history) for history in histories]
    assert row["seconds_per_epoch"]["mean"] == pytest.approx(statistics.fmean(per_run))
    purchase = row["tasks"]["purchase"]["auc"]
    assert "none-s0 +2" in stdout and f"{purchase['mean']:.4f}" in stdout and f"±{purchase['std']:.4f}" in stdout


def test_a_glob_gives_a_row_per_setting_and_the_setting_that_differs(sweep: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("none-s0", "none-s1", "meta"):
        copy_run(sweep / name, runs / name)
    (copy_run(sweep / "meta", runs / ".meta.partial") / "metrics.json").unlink()  # fit's staging: not a run
    (runs / "notes.txt").write_text("a file beside the runs\n")
    comparison, stdout, stderr = compare(str(runs / "*"), json_path=tmp_path / "compare.json")
    assert stderr == ""
    assert comparison["columns"] == ["balance"]
    meta, none = comparison["rows"]  # a glob's matches by name, each row where its first run is
    assert meta["runs"] == [str(runs / "meta")] and meta["settings"]["balance"] == "metabalance"
    assert meta["n"] == 1 and meta["tasks"]["purchase"]["auc"]["std"] is None
    assert meta["tasks"]["purchase"]["auc"]["mean"] == read_json(sweep / "meta" / "metrics.json")["tasks"][
        "purchase"]["auc"]
    assert none["runs"] == [str(runs / "none-s0"), str(runs / "none-s1")] and none["seeds"] == [0, 1]
    assert "balance" in stdout and "none-s0 +1" in stdout  # the table folds cells to fit 80 columns: no more


def test_different_task_sets_are_listed_by_task_name(sweep: Path, tmp_path: Path) -> None:
    comparison, stdout, _ = compare(str(sweep / "meta"), str(sweep / "click-only"), json_path=tmp_path / "c.json")
    assert comparison["columns"] == ["tasks", "balance"]
    meta, click = comparison["rows"]
    assert meta["settings"]["tasks"] == ["purchase", "click"] and click["settings"]["tasks"] == ["click"]
    assert set(meta["tasks"]) == {"purchase", "click"} and set(click["tasks"]) == {"click"}
    assert click["main_task"] == "click"
    assert "—" in stdout  # click-only has no purchase metrics


def test_older_runs_and_null_metrics_still_compare(sweep: Path, tmp_path: Path) -> None:
    """An older run lacks newer settings (defaults) and metrics (null); a null metric is left out of its mean."""
    runs = [copy_run(sweep / f"none-s{seed}", tmp_path / f"s{seed}") for seed in range(3)]

    def older(raw: dict) -> None:
        del raw["model"]["norm"], raw["train"]["monitor"]

    def without_new_metrics(raw: dict) -> None:
        del raw["monitor"]
        for values in raw["tasks"].values():
            del values["ne"], values["pr_auc"], values["calibration"]

    def single_class(raw: dict) -> None:
        raw["tasks"]["purchase"]["auc"] = None

    edit_json(runs[0] / "config.json", older)
    edit_json(runs[0] / "metrics.json", without_new_metrics)
    edit_json(runs[1] / "metrics.json", single_class)
    (runs[2] / "history.jsonl").unlink()
    comparison, stdout, stderr = compare(*map(str, runs), json_path=tmp_path / "compare.json")
    assert stderr == ""
    [row] = comparison["rows"]
    assert row["n"] == 3
    metrics = [read_json(run / "metrics.json")["tasks"]["purchase"] for run in runs]
    auc = row["tasks"]["purchase"]["auc"]
    assert auc["n"] == 2 and auc["mean"] == pytest.approx((metrics[0]["auc"] + metrics[2]["auc"]) / 2)
    assert row["tasks"]["purchase"]["ne"]["n"] == 2
    assert row["seconds_per_epoch"]["n"] == 2
    assert "(n=2)" in stdout


def test_unreadable_runs_each_give_one_warning_and_the_rest_compare(sweep: Path, tmp_path: Path) -> None:
    good = copy_run(sweep / "none-s0", tmp_path / "good")
    unfinished = copy_run(sweep / "none-s1", tmp_path / "unfinished")
    (unfinished / "metrics.json").unlink()
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    broken = copy_run(sweep / "meta", tmp_path / "broken")
    (broken / "config.json").write_text('{"data": ')
    missing, nothing = tmp_path / "missing", str(tmp_path / "nothing-*")
    args = [str(good), str(unfinished), str(not_a_run), str(broken), str(missing), nothing, str(good)]
    comparison, _, stderr = compare(*args, json_path=tmp_path / "compare.json")
    expected = [
        f"{unfinished}: unfinished run (no metrics.json): still training, or interrupted",
        f"{not_a_run}: not an mbtrain run (no config.json)",
        f"{broken}: config.json is not valid JSON",
        f"{missing}: no such directory",
        f"{nothing}: no run directory matches",
    ]
    assert stderr.splitlines() == [f"mbtrain: warning: {line}" for line in expected]
    assert comparison["skipped"] == expected
    assert [row["runs"] for row in comparison["rows"]] == [[str(good)]]  # named twice, counted once


@pytest.mark.parametrize("what", ["unreadable", "no match"])
def test_nothing_to_compare_is_one_error_line(what: str, sweep: Path, tmp_path: Path) -> None:
    if what == "unreadable":
        unfinished = copy_run(sweep / "none-s0", tmp_path / "unfinished")
        (unfinished / "metrics.json").unlink()
        args, named = [str(unfinished), str(tmp_path)], [str(unfinished), str(tmp_path)]
    else:
        args = named = [str(tmp_path / "runs" / "*")]
    result = run_cli("compare", *args, "--json", str(tmp_path / "compare.json"))
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("mbtrain: error: nothing to compare: ")
    assert all(name in line for name in named)
    assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "compare.json").exists()
