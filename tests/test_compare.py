"""`mbtrain compare` end to end: tiny runs made with `mbtrain fit`, compared through the CLI."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from mbtrain.compare import _matches
from mbtrain.stats import METHOD
from tests.helpers import make_frame, make_log, run_cli


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


# --- --baseline: every other row paired with the baseline row, seed by seed -----------------------------------


def as_seed(run: Path, target: Path, seed: int, **train: object) -> Path:
    """A copy of `run` that says it was trained with `seed` (and any other train settings given)."""
    copy_run(run, target)
    edit_json(target / "config.json", lambda raw: raw["train"].update(seed=seed, **train))
    return target


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    n, mean = len(diffs), statistics.fmean(diffs)
    half = scipy_stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def flat(text: str) -> str:
    """The table's text with its folds and padding undone, to find a caption's words in."""
    return " ".join(text.split())


def test_baseline_pairs_every_other_row_by_seed_with_a_t_interval(sweep: Path, tmp_path: Path) -> None:
    baseline = [sweep / f"none-s{seed}" for seed in range(3)]
    meta = [as_seed(sweep / "meta", tmp_path / f"meta-s{seed}", seed) for seed in range(3)]
    comparison, stdout, stderr = compare(*map(str, meta + baseline), "--baseline", "balance=none",
                                         json_path=tmp_path / "compare.json")
    assert stderr == ""
    assert comparison["baseline"] == {
        "setting": "balance", "value": "none", "row": 1, "runs": list(map(str, baseline)), "task": "purchase",
        "metric": "auc", "higher_is_better": True,
        "compared_on": "validation metrics at each run's best epoch (metrics.json), paired by seed",
        "method": METHOD}
    row, base = comparison["rows"]
    assert base["baseline"] is True and base["paired"] is None
    assert row["baseline"] is False
    paired = row["paired"]
    assert paired["seeds"] == [0, 1, 2] and paired["left_out"] == {"this_row": [], "baseline": []}
    ours = [read_json(run / "metrics.json")["tasks"] for run in meta]
    theirs = [read_json(run / "metrics.json")["tasks"] for run in baseline]
    for task, block in [("purchase", paired["main"]), *paired["tasks"].items()]:
        diffs = [m[task]["auc"] - b[task]["auc"] for m, b in zip(ours, theirs, strict=True)]
        mean, low, high = t_interval(diffs)
        assert block["n"] == 3 and block["method"] == METHOD and block["higher_is_better"] is True
        assert block["mean"] == pytest.approx(mean)
        assert block["std"] == pytest.approx(statistics.stdev(diffs))
        assert block["low"] == pytest.approx(low, abs=1e-6) and block["high"] == pytest.approx(high, abs=1e-6)
        assert block["won"] == sum(diff > 0 for diff in diffs)
    assert paired["main"]["task"] == "purchase" and paired["main"]["metric"] == "auc"
    assert list(paired["tasks"]) == ["purchase", "click"]
    main = paired["main"]
    assert f"{main['mean']:+.4f} [{main['low']:+.4f}, {main['high']:+.4f}]" in stdout
    assert f"{main['won']}/3" in stdout
    assert ["none-s0", "+2", "baseline"] in [line.split() for line in stdout.splitlines()]  # marked
    assert "validation metrics at each run's best epoch (metrics.json), paired by seed" in flat(stdout)
    assert METHOD in flat(stdout)


@pytest.mark.parametrize("monitor", ["auc", "logloss"])
def test_a_clear_win_says_better(monitor: str, sweep: Path, tmp_path: Path) -> None:
    """Hand-made metrics: the row beats the baseline by far more than the seeds' spread, on every seed; for log
    loss, lower is better."""
    runs = []
    for seed in range(3):
        base = as_seed(sweep / f"none-s{seed}", tmp_path / f"base-s{seed}", seed, monitor=monitor)
        ours = as_seed(sweep / "meta", tmp_path / f"ours-s{seed}", seed, monitor=monitor)
        baseline_value = read_json(base / "metrics.json")["tasks"]["purchase"][monitor]
        gain = 0.05 + 0.001 * seed

        def improved(raw: dict, value: float = baseline_value + (gain if monitor == "auc" else -gain)) -> None:
            raw["monitor"] = monitor
            raw["tasks"]["purchase"][monitor] = value

        edit_json(base / "metrics.json", lambda raw: raw.update(monitor=monitor))
        edit_json(ours / "metrics.json", improved)
        runs += [ours, base]
    comparison, stdout, _ = compare(*map(str, runs), "--baseline", "balance=none", json_path=tmp_path / "c.json")
    assert comparison["baseline"]["metric"] == monitor
    assert comparison["baseline"]["higher_is_better"] is (monitor == "auc")
    main = comparison["rows"][0]["paired"]["main"]
    assert main["metric"] == monitor and main["n"] == 3 and main["won"] == 3
    assert main["mean"] == pytest.approx(0.051 if monitor == "auc" else -0.051)
    assert main["verdict"] == "better"
    [line] = [line.split() for line in stdout.splitlines() if line.startswith("ours-s0 +2") and "/" in line]
    assert line[-2:] == ["3/3", "better"]
    assert ("higher is better" if monitor == "auc" else "lower is better") in flat(stdout)


def test_one_common_seed_gives_no_interval_and_the_left_out_seeds_are_counted(sweep: Path, tmp_path: Path) -> None:
    baseline = [sweep / f"none-s{seed}" for seed in range(3)]
    meta = [copy_run(sweep / "meta", tmp_path / "meta-s0"), as_seed(sweep / "meta", tmp_path / "meta-s5", 5)]
    comparison, stdout, _ = compare(*map(str, meta + baseline), "--baseline", "balance=none",
                                    json_path=tmp_path / "compare.json")
    paired = comparison["rows"][0]["paired"]
    assert paired["seeds"] == [0] and paired["left_out"] == {"this_row": [5], "baseline": [1, 2]}
    main = paired["main"]
    assert main["n"] == 1 and main["std"] is None and main["low"] is None and main["high"] is None
    assert main["verdict"] == "no interval: at least 2 seeds are needed"
    expected = (read_json(meta[0] / "metrics.json")["tasks"]["purchase"]["auc"]
                - read_json(baseline[0] / "metrics.json")["tasks"]["purchase"]["auc"])
    assert main["mean"] == pytest.approx(expected)
    assert "at least 2 seeds needed" in flat(stdout)
    assert "left out 1 seed only in this row (5) and 2 seeds only in the baseline (1, 2)" in flat(stdout)


def test_no_common_seed_pairs_nothing_and_stays_valid_json(sweep: Path, tmp_path: Path) -> None:
    meta = as_seed(sweep / "meta", tmp_path / "meta-s7", 7)
    comparison, stdout, _ = compare(str(meta), str(sweep / "none-s0"), "--baseline", "balance=none",
                                    json_path=tmp_path / "compare.json")
    main = comparison["rows"][0]["paired"]["main"]
    assert main["n"] == 0 and main["mean"] is None
    assert main["verdict"] == "nothing to pair: no seed in common with the baseline"
    assert "NaN" not in (tmp_path / "compare.json").read_text()
    assert "no seed in common" in stdout


@pytest.mark.parametrize(("baseline", "message"), [
    ("balance", "--baseline expects KEY=VALUE, a setting and its value, e.g. balance=none: got 'balance'"),
    ("learning-rate=0.01", "--baseline learning-rate=0.01: 'learning-rate' is not a setting (e.g. balance, lr, "
                           "model, relax-factor)"),
    ("balanse=none", "--baseline balanse=none: 'balanse' is not a setting (did you mean balance?)"),
    ("seed=0", "--baseline seed=0: seed is not compared (runs that differ only in seed, threads, device, "
               "memory-budget, tensorboard are one row); name a setting such as balance=none"),
    ("balance=famo", "--baseline balance=famo matches no row: among these runs balance is none or metabalance"),
    ("relax-factor=0.70", "--baseline relax-factor=0.70 matches 2 rows (none-s0, meta), which differ in balance: "
                          "name fewer runs, so that one row has relax-factor 0.70"),
])
def test_a_baseline_that_names_no_single_row_is_one_error_line(baseline: str, message: str, sweep: Path,
                                                               tmp_path: Path) -> None:
    result = run_cli("compare", str(sweep / "none-s0"), str(sweep / "meta"), "--baseline", baseline,
                     "--json", str(tmp_path / "compare.json"))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"mbtrain: error: {message}"]
    assert result.stdout == "" and not (tmp_path / "compare.json").exists()


@pytest.mark.parametrize(("setting", "text", "matches"), [
    ("none", "none", True), ("metabalance", "none", False),
    (0.7, "0.70", True), (0.7, ".7", True), (0.7, "0.8", False), (0.7, "high", False), (64, "64", True),
    (None, "none", True), (None, "null", True), (None, "", True), (None, "0", False),
    (True, "true", True), (True, "yes", True), (False, "false", True), (False, "true", False),
    (["purchase", "click"], "purchase,click", True), (["purchase", "click"], "purchase, click", True),
    (["purchase", "click"], "click,purchase", False), ([64, 32], "64,32", True), ([], "none", True),
    ({"purchase": 1.0, "click": 0.3}, "purchase=1,click=0.3", True), ({"click": 0.3}, "click=0.5", False),
    ({}, "none", True),
])
def test_a_baseline_value_is_read_as_its_setting_type(setting: object, text: str, matches: bool) -> None:
    assert _matches(setting, text) is matches


def test_a_regression_main_task_shows_its_metrics_and_pairs_each_task_in_its_own(tmp_path: Path) -> None:
    """Without --monitor a regression main task is judged on RMSE (its type's default): the table shows its
    regression metrics, and --baseline pairs it on RMSE (lower is better) and the binary task on AUC."""
    data = tmp_path / "log.parquet"
    make_log(400, seed=0).write_parquet(data)
    for balance in ("none", "metabalance"):
        for seed in (0, 1):
            result = run_cli("fit", str(data), "--tasks", "watch,click", "--epochs", "2", "--batch-size", "64",
                             "--threads", "1", "--balance", balance, "--seed", str(seed),
                             "--out", str(tmp_path / "runs" / f"{balance}-s{seed}"))
            assert result.exit_code == 0, result.output
    comparison, stdout, _ = compare(str(tmp_path / "runs" / "*"), "--baseline", "balance=none",
                                    json_path=tmp_path / "compare.json")
    meta = next(row for row in comparison["rows"] if row["settings"]["balance"] == "metabalance")
    for metric in ("RMSE", "MAE", "XAUC"):
        assert metric in stdout
    assert f"{meta['tasks']['watch']['rmse']['mean']:.4f}" in stdout
    assert comparison["baseline"]["metric"] == "rmse" and comparison["baseline"]["higher_is_better"] is False
    paired = meta["paired"]
    assert paired["main"]["task"] == "watch" and paired["main"]["metric"] == "rmse"
    assert paired["tasks"]["watch"]["higher_is_better"] is False and paired["tasks"]["click"]["higher_is_better"]
    none = next(row for row in comparison["rows"] if row["settings"]["balance"] == "none")
    assert paired["tasks"]["click"]["mean"] == pytest.approx(
        meta["tasks"]["click"]["auc"]["mean"] - none["tasks"]["click"]["auc"]["mean"])
