"""mbtrain sweep end to end on tiny generated data: identical splits per seed, selection on validation only,
resume, the plan, the report, the paired statistics, bad input."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mbtrain.stats import T_975, holm, paired, t_p_value, t_quantile
from tests.helpers import make_frame, make_log, run_cli

COMMON = ["--tasks", "purchase,click", "--epochs", "2", "--batch-size", "64", "--threads", "1", "--patience", "0"]
GRID = ["--balance", "none,metabalance", "--lr", "0.01,0.003", "--seeds", "2"]


def _sweep(data: Path, out: Path, *extra: str) -> Any:
    return run_cli("sweep", str(data), *COMMON, *GRID, *extra, "--out", str(out))


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "sweep.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep-data")
    make_frame(600, seed=0).write_parquet(folder / "train.parquet")
    test = make_frame(200, seed=1)
    test.write_parquet(folder / "test.parquet")
    test.with_columns((1 - pl.col("purchase")).alias("purchase"), (1 - pl.col("click")).alias("click")
                      ).write_parquet(folder / "flipped.parquet")
    return folder


@pytest.fixture(scope="module")
def swept(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweeps") / "held-out"
    result = _sweep(data / "train.parquet", out)
    assert result.exit_code == 0, result.output
    return out


def test_every_run_of_a_seed_reads_the_same_rows(swept: Path) -> None:
    summary = _summary(swept)
    assert len(summary["runs"]) == 8 and all(run["status"] == "finished" for run in summary["runs"])
    for seed in (0, 1):
        configs = [json.loads((Path(run["folder"]) / "config.json").read_text())
                   for run in summary["runs"] if run["seed"] == seed]
        assert len({json.dumps(config["paths"]) for config in configs}) == 1  # same training and validation files
        split = swept / "splits" / f"seed{seed}"
        ids = [set(pl.read_parquet(split / f"{name}.parquet")["row_id"]) for name in ("train", "valid", "test")]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        assert len(ids[0] | ids[1] | ids[2]) == 600 and len(ids[2]) == 120  # --test-fraction 0.2
    assert set(pl.read_parquet(swept / "splits/seed0/test.parquet")["row_id"]) != set(
        pl.read_parquet(swept / "splits/seed1/test.parquet")["row_id"])


def test_each_method_keeps_its_best_validation_configuration_and_only_it_meets_the_test_rows(swept: Path) -> None:
    summary = _summary(swept)
    for method in ("none", "metabalance"):
        assert summary["methods"][method]["configurations"] == 2
        for seed in (0, 1):
            runs = [run for run in summary["runs"] if run["method"] == method and run["seed"] == seed]
            best = max(runs, key=lambda run: run["valid"]["purchase"]["auc"])
            assert [run["selected"] for run in runs] == [run is best for run in runs]
            for run in runs:
                assert (Path(run["folder"]) / "test_metrics.json").is_file() == run["selected"]
                assert (run["test"] is not None) == run["selected"]
    block = summary["methods"]["metabalance"]
    differences = [mb["test"]["purchase"]["auc"] - none["test"]["purchase"]["auc"]
                   for mb, none in _selected_pairs(summary, "metabalance", "none")]
    assert block["paired"]["purchase"]["mean"] == pytest.approx(sum(differences) / 2)
    assert block["paired"]["purchase"]["n"] == 2


def _selected_pairs(summary: dict[str, Any], method: str, baseline: str) -> list[tuple[dict, dict]]:
    chosen = {(run["method"], run["seed"]): run for run in summary["runs"] if run["selected"]}
    return [(chosen[method, seed], chosen[baseline, seed]) for seed in summary["seeds"]]


def test_test_rows_choose_nothing(data: Path, tmp_path: Path) -> None:
    """The same sweep scored on a test file and on that file with every label flipped: the same runs are chosen
    (their test AUCs mirror each other), which could not hold if the test rows took part in any choice."""
    chosen = []
    for name in ("test", "flipped"):
        out = tmp_path / name
        result = _sweep(data / "train.parquet", out, "--test", str(data / f"{name}.parquet"))
        assert result.exit_code == 0, result.output
        chosen.append({run["name"]: run["test"] for run in _summary(out)["runs"] if run["selected"]})
    assert chosen[0].keys() == chosen[1].keys() and len(chosen[0]) == 4
    for name, test in chosen[0].items():
        assert test["purchase"]["auc"] == pytest.approx(1 - chosen[1][name]["purchase"]["auc"])


def test_an_interrupted_sweep_finishes_only_what_is_missing(swept: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    definition = json.loads((out / "definition.json").read_text())
    assert definition["data"] == str((data / "train.parquet").resolve())
    runs = out / "runs"
    (runs / "metabalance-1-seed1" / "metrics.json").unlink()  # stopped after an epoch: resumed from last.pt
    shutil.rmtree(runs / "none-0-seed0")  # never started
    untouched = {path: path.stat().st_mtime_ns for path in runs.glob("*/metrics.json")}
    result = _sweep(data / "train.parquet", out)
    assert result.exit_code == 0, result.output
    assert "(6 done)" in result.output
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in untouched.items())
    assert (runs / "metabalance-1-seed1" / "metrics.json").is_file()
    assert (runs / "none-0-seed0" / "metrics.json").is_file()
    resumed = [json.loads(line) for line in (runs / "metabalance-1-seed1" / "history.jsonl").read_text().splitlines()]
    original = [json.loads(line) for line in
                (swept / "runs" / "metabalance-1-seed1" / "history.jsonl").read_text().splitlines()]
    assert [row["valid"]["purchase"]["auc"] for row in resumed] == [row["valid"]["purchase"]["auc"] for row in original]


def test_the_plan_reproduces_the_sweeps_runs(swept: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "planned"
    result = _sweep(data / "train.parquet", out, "--plan")
    assert result.exit_code == 0, result.output
    lines = (out / "plan.txt").read_text().splitlines()
    assert len(lines) == 8 and all(line.startswith("mbtrain fit ") for line in lines)
    assert not (out / "runs").exists()
    first = shlex.split(lines[0])
    result = run_cli(*first[1:])
    assert result.exit_code == 0, result.output
    name = Path(first[first.index("--out") + 1]).name
    ours = json.loads((out / "runs" / name / "metrics.json").read_text())["tasks"]
    theirs = json.loads((swept / "runs" / name / "metrics.json").read_text())["tasks"]
    assert ours == theirs
    again = run_cli("sweep", "--report", str(out))  # what has finished: one run
    assert again.exit_code == 0, again.output
    assert "7 run(s) not finished" in again.output.replace("\n", " ") or "not finished" in again.output


def test_report_again_and_a_different_grid(swept: Path, data: Path, tmp_path: Path) -> None:
    result = run_cli("sweep", "--report", str(swept))
    assert result.exit_code == 0, result.output
    assert "metabalance against none on purchase:" in result.output
    out = tmp_path / "copy"
    shutil.copytree(swept, out)
    other = run_cli("sweep", str(data / "train.parquet"), *COMMON, "--balance", "none,famo", "--seeds", "2",
                    "--out", str(out))
    assert other.exit_code == 2 and "holds another sweep (its grid lists, grid methods differ): pass --overwrite" \
        in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("arguments", "message"), [
    (["--balance", "none,metabalance", "--lr", ","], "--lr: an empty value in the list"),
    (["--balance", "none,metabalance", "--valid-fraction", "0.1,0.2"], "--valid-fraction takes one value"),
    (["--balance", "none,bogus"], "--balance 'bogus' is not a method"),
    (["--balance", "none,metabalance", "--seeds", "1"], "at least 2 seeds"),
    (["--balance", "none,metabalance", "--relax-factor", "0.5,1.5"], "--relax-factor must be in [0, 1)"),
    (["--balance", "none", "--bogus-flag", "1"], "--bogus-flag is not a setting of mbtrain fit"),
    (["--balance", "none", "--funnel", "yes"], "--funnel is a switch and takes no value"),
])
def test_bad_input_is_one_line(arguments: list[str], message: str, data: Path, tmp_path: Path) -> None:
    result = run_cli("sweep", str(data / "train.parquet"), "--tasks", "purchase,click", *arguments,
                     "--out", str(tmp_path / "s"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_list_multiplies_only_the_methods_it_belongs_to(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    result = run_cli("sweep", str(data / "train.parquet"), *COMMON, "--balance", "none", "metabalance",
                     "--relax-factor", "0.5,0.9", "--task-weights", "click=1", "click=0.3", "--seeds", "2",
                     "--out", str(out), "--plan")
    assert result.exit_code == 0, result.output
    names = sorted(path.stem for path in (out / "configs").glob("*.toml"))
    assert len([n for n in names if n.startswith("none-")]) == 2 * 2  # the task weights only
    assert len([n for n in names if n.startswith("metabalance-")]) == 4 * 2  # task weights × relax factors
    text = (out / "configs" / "metabalance-3-seed1.toml").read_text()
    assert "relax_factor = 0.9" in text and 'task_weights = {"click" = 0.3}' in text and "seed = 1" in text


def test_a_level_list_multiplies_the_methods_with_a_choice_of_level(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    result = run_cli("sweep", str(data / "train.parquet"), *COMMON, "--balance", "none,pcgrad,multibalance",
                     "--balance-level", "representation,parameters", "--seeds", "2", "--out", str(out), "--plan")
    assert result.exit_code == 0, result.output
    levels = {path.stem: "representation" if 'balance_level = "representation"' in path.read_text()
              else "parameters" for path in (out / "configs").glob("*.toml")}
    assert sorted(levels) == ["multibalance-0-seed0", "multibalance-0-seed1", "none-0-seed0", "none-0-seed1",
                              "pcgrad-0-seed0", "pcgrad-0-seed1", "pcgrad-1-seed0", "pcgrad-1-seed1"]
    assert [levels[f"pcgrad-{n}-seed0"] for n in (0, 1)] == ["representation", "parameters"]
    assert (levels["none-0-seed0"], levels["multibalance-0-seed1"]) == ("parameters", "representation")  # their own


def test_the_paired_interval_is_students_t() -> None:
    scipy = pytest.importorskip("scipy.stats")
    method, baseline = [0.71, 0.74, 0.69, 0.75, 0.72], [0.70, 0.71, 0.70, 0.72, 0.70]
    result = paired(method, baseline)
    differences = [m - b for m, b in zip(method, baseline, strict=True)]
    mean = sum(differences) / 5
    std = (sum((d - mean) ** 2 for d in differences) / 4) ** 0.5
    half = scipy.t.ppf(0.975, 4) * std / 5**0.5
    assert (result.low, result.high) == pytest.approx((mean - half, mean + half), abs=1e-5)
    assert result.won == 4 and result.low < 0 < result.high
    assert result.verdict() == f"no difference this sweep can detect (it would see about ±{half:.4f})"
    for df in (1, 2, 7, 29, 33, 45, 90, 250, 10_000):
        assert t_quantile(df) == pytest.approx(scipy.t.ppf(0.975, df), abs=2e-4)
    assert paired([0.8, None, 0.9], [0.7, 0.7, None]).n == 1
    assert paired([0.8, None], [0.7, 0.7]).verdict() == "no interval: at least 2 seeds are needed"
    assert paired([0.80, 0.81, 0.82], [0.70, 0.70, 0.71]).verdict() == "better"
    assert paired([0.7, 0.6], [0.7, 0.6]).verdict() == "identical on every seed"
    assert paired([0.5, 0.4, 0.45], [0.3, 0.3, 0.31], higher_is_better=False).verdict() == "worse"


def test_the_p_value_is_students_and_holm_adjusts_it_for_the_methods_compared() -> None:
    for df, quantile in T_975.items():  # the tabulated 97.5 % quantiles are where the two-sided p is 5 %
        assert t_p_value(quantile, df) == pytest.approx(0.05, abs=1e-6)
    assert t_p_value(1.0, 1) == pytest.approx(0.5) and t_p_value(0.0, 4) == pytest.approx(1.0)
    assert holm([0.01, 0.04, 0.03, None, 0.5]) == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    # three methods each "better" alone, at p 0.0033, 0.035 and 0.035 (paired differences over 3 seeds)
    base = [0.70, 0.71, 0.74]
    pairs = [paired([b + d for b, d in zip(base, diffs, strict=True)], base)
             for diffs in ([0.09, 0.10, 0.11], [0.04, 0.08, 0.06], [0.06, 0.08, 0.04])]
    assert [pair.verdict() for pair in pairs] == ["better"] * 3
    for pair, adjusted in zip(pairs, holm([pair.p for pair in pairs]), strict=True):
        pair.adjusted_p, pair.compared = adjusted, 3
    assert pairs[0].verdict() == "better" and pairs[0].adjusted_p == pytest.approx(3 * pairs[0].p)
    assert pairs[1].adjusted_p == pytest.approx(2 * pairs[1].p)
    assert pairs[1].verdict() == ("no difference once adjusted for 3 methods compared (Holm p 0.070; alone it would "
                                  "read better)")
    scipy = pytest.importorskip("scipy.stats")
    for t, df in ((2.1, 3), (0.4, 9), (5.0, 2), (1.7, 40)):
        assert t_p_value(t, df) == pytest.approx(2 * scipy.t.sf(t, df), rel=1e-9)


def test_the_report_gives_the_adjusted_p_beside_the_interval(swept: Path) -> None:
    pair = _summary(swept)["methods"]["metabalance"]["paired"]["purchase"]
    assert pair["adjusted_p"] == pair["p"] and pair["compared"] == 1  # one method against the baseline
    assert "Holm" in pair["adjustment"]
    result = run_cli("sweep", "--report", str(swept))
    assert result.exit_code == 0 and "Holm p" in result.stdout


def test_the_picture_or_how_to_get_it(swept: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    assert (swept / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (swept / "sweep.svg").is_file()
    (swept / "sweep.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    result = run_cli("sweep", "--report", str(swept))
    assert result.exit_code == 0, result.output
    assert "pip install 'mbtrain[plot]'" in result.output and not (swept / "sweep.png").exists()


def test_a_toml_grid_with_a_method_of_its_own(data: Path, tmp_path: Path) -> None:
    """Lists in TOML; [method.NAME] adds the plain sum with tuned task weights beside the untuned one."""
    toml = tmp_path / "sweep.toml"
    toml.write_text('tasks = "purchase,click"\nbalance = ["none", "metabalance"]\nseed = [0, 1]\nlr = [0.01, 0.003]\n'
                    '[method.tuned-sum]\nbalance = "none"\ntask-weights = ["click=1", "click=0.3", "click=0.1"]\n')
    out = tmp_path / "planned"
    result = run_cli("sweep", str(data / "train.parquet"), "--config", str(toml), "--out", str(out), "--plan")
    assert result.exit_code == 0, result.output
    names = sorted(path.stem for path in (out / "configs").glob("*.toml"))
    assert sum(n.startswith("none-") for n in names) == 2 * 2  # lr × seeds
    assert sum(n.startswith("metabalance-") for n in names) == 2 * 2
    assert sum(n.startswith("tuned-sum-") for n in names) == 2 * 3 * 2  # lr × task weights × seeds
    text = (out / "configs" / "tuned-sum-5-seed1.toml").read_text()
    assert 'balance = "none"' in text and 'task_weights = {"click" = 0.1}' in text and "lr = 0.003" in text


def test_two_jobs_at_once_give_the_same_sweep(swept: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    result = _sweep(data / "train.parquet", out, "--jobs", "2")
    assert result.exit_code == 0, result.output
    ours, theirs = _summary(out), _summary(swept)
    assert [(run["name"], run["selected"], run["valid"], run["test"]) for run in ours["runs"]] == [
        (run["name"], run["selected"], run["valid"], run["test"]) for run in theirs["runs"]]
    assert sum((Path(run["folder"]) / "test_metrics.json").is_file() for run in ours["runs"]) == 4


@pytest.mark.parametrize("tasks", ["click,like,watch", "watch,click,like"])
def test_tasks_of_other_types_are_each_reported_in_their_own_metric(tasks: str, tmp_path: Path) -> None:
    """A regression task beside binary ones, main or auxiliary: each task's test metric, paired difference and
    direction are its type's (RMSE, lower is better, beside AUC), never a blank for want of the main one's."""
    data = tmp_path / "log.parquet"
    make_log(600, seed=0).write_parquet(data)
    out = tmp_path / "mixed"
    result = run_cli("sweep", str(data), "--tasks", tasks, "--missing-labels", "skip", "--weight-column", "weight",
                     "--epochs", "2", "--batch-size", "64", "--threads", "1", "--patience", "0",
                     "--balance", "none,metabalance", "--seeds", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = _summary(out)
    expected = {"click": "auc", "like": "auc", "watch": "rmse"}
    assert summary["metric"] == expected[tasks.split(",")[0]] and summary["task_metrics"] == expected
    assert summary["task_higher_is_better"] == {"click": True, "like": True, "watch": False}
    selected = {(run["method"], run["seed"]): run["test"] for run in summary["runs"] if run["selected"]}
    for method, block in summary["methods"].items():
        for task, metric in expected.items():
            values = [selected[method, seed][task][metric] for seed in (0, 1)]
            assert all(isinstance(value, float) for value in values)
            assert block["test"][task]["mean"] == pytest.approx(sum(values) / 2) and block["test"][task]["n"] == 2
    meta, none = summary["methods"]["metabalance"]["paired"]["watch"], summary["methods"]["none"]["test"]["watch"]
    assert meta["n"] == 2 and meta["higher_is_better"] is False
    assert meta["mean"] == pytest.approx(summary["methods"]["metabalance"]["test"]["watch"]["mean"] - none["mean"])
    tables = {expected[task] for task in tasks.split(",")[1:]}  # the auxiliary tasks: a table per metric
    assert all(f"auxiliary tasks' test {name}: Δ against none" in result.output for name in tables)
    assert "—" not in result.output and "rmse: lower is better" in result.output


def test_compare_pairs_a_sweeps_runs_by_seed(swept: Path, tmp_path: Path) -> None:
    """Each seed's runs read that seed's split files: compare takes them for one row per configuration anyway."""
    out = tmp_path / "comparison.json"
    result = run_cli("compare", str(swept / "runs" / "*-0-seed*"), "--baseline", "balance=none", "--json", str(out))
    assert result.exit_code == 0, result.output
    comparison = json.loads(out.read_text())
    assert [len(row["runs"]) for row in comparison["rows"]] == [2, 2]
    paired_rows = [row["paired"] for row in comparison["rows"] if row.get("paired")]
    assert len(paired_rows) == 1 and paired_rows[0]["seeds"] == [0, 1]


def _split(out: Path, seed: int | str, part: str) -> pl.DataFrame:
    return pl.read_parquet(out / "splits" / (seed if isinstance(seed, str) else f"seed{seed}") / f"{part}.parquet")


def test_a_time_split_holds_out_the_latest_rows_for_every_seed(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "by-time"
    result = _sweep(data / "train.parquet", out, "--split-time", "row_id", "--exclude", "row_id", "--plan")
    assert result.exit_code == 0, result.output
    train, valid, test = (_split(out, "by-time", part)["row_id"] for part in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (432, 48, 120)  # 600 rows: 20 % test, 10 % of the rest valid
    assert train.max() < valid.min() and valid.max() < test.min()
    configs = [(out / "configs" / f"none-0-seed{seed}.toml").read_text() for seed in (0, 1)]
    assert all("splits/by-time/valid.parquet" in text for text in configs)  # every seed reads the one split
    report = run_cli("sweep", "--report", str(out))  # nothing ran: the report says what the intervals speak for
    assert report.exit_code == 0, report.output
    assert "one split by row_id that every seed shares" in " ".join(report.stdout.split())
    assert _summary(out)["split"]["by"] == "time"


def test_a_group_split_keeps_each_groups_rows_together(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "by-group"
    result = _sweep(data / "train.parquet", out, "--split-group", "user", "--plan")
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        parts = {part: set(_split(out, seed, part)["user"]) for part in ("train", "valid", "test")}
        assert not parts["train"] & parts["valid"] and not parts["train"] & parts["test"]
        assert not parts["valid"] & parts["test"] and all(parts.values())
        assert len(_split(out, seed, "test")) >= 120  # whole groups until a fifth of the rows
    assert set(_split(out, 0, "test")["user"]) != set(_split(out, 1, "test")["user"])


@pytest.mark.parametrize(("flags", "message"), [
    (["--split-time", "when"], "--split-time when: "),
    (["--split-time", "price"], "--split-time price: "),  # price has nulls
    (["--split-group", "user", "--split-time", "row_id"], "contradict each other"),
])
def test_a_bad_split_column_is_one_line(flags: list[str], message: str, data: Path, tmp_path: Path) -> None:
    result = _sweep(data / "train.parquet", tmp_path / "bad", *flags, "--plan")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_a_time_split_keeps_each_time_in_one_part(tmp_path: Path) -> None:
    data = tmp_path / "days.parquet"
    make_frame(600, seed=0).with_columns(day=pl.col("row_id") // 100).write_parquet(data)
    out = tmp_path / "by-day"
    result = _sweep(data, out, "--split-time", "day", "--exclude", "row_id,day", "--plan")
    assert result.exit_code == 0, result.output
    days = {part: set(_split(out, "by-time", part)["day"]) for part in ("train", "valid", "test")}
    # 120 test rows asked: the cut moves back to where day 4 begins; 48 validation rows: back to day 3's start
    assert days == {"train": {0, 1, 2}, "valid": {3}, "test": {4, 5}}


def test_a_mistyped_split_column_leaves_no_folder_behind(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "typo"
    result = _sweep(data / "train.parquet", out, "--split-time", "rowid", "--plan")
    assert result.exit_code == 2 and "--split-time rowid" in result.stderr and not out.exists()
    assert _sweep(data / "train.parquet", out, "--split-time", "row_id", "--plan").exit_code == 0


def test_a_group_split_never_empties_a_part(tmp_path: Path) -> None:
    """One group of 90 rows beside 10 of one row: each seed either splits with every part holding whole groups,
    or says in one line that the largest group holds 90 % of the rows."""
    frame = make_frame(100, seed=0).with_columns(
        team=pl.Series([0] * 90 + list(range(1, 11))).cast(pl.Int64).cast(pl.String))
    data = tmp_path / "teams.parquet"
    frame.write_parquet(data)
    for seed in range(4):
        out = tmp_path / f"teams{seed}"
        result = run_cli("sweep", str(data), *COMMON, "--balance", "none,metabalance", "--seed", f"{seed},{seed + 10}",
                         "--split-group", "team", "--out", str(out), "--plan")
        if result.exit_code:
            assert result.stderr.count("\n") == 1 and "the largest holds 90% of the rows" in result.stderr
            continue
        parts = {part: set(_split(out, seed, part)["team"]) for part in ("train", "valid", "test")}
        assert all(parts.values()) and not parts["train"] & (parts["valid"] | parts["test"])


def test_a_split_flag_with_both_held_out_files_is_one_line(data: Path, tmp_path: Path) -> None:
    result = _sweep(data / "train.parquet", tmp_path / "files", "--split-group", "user", "--test",
                    str(data / "test.parquet"), "--valid", str(data / "test.parquet"), "--plan")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "splits nothing" in result.stderr


def test_a_sweep_begun_with_other_default_seeds_goes_on_with_its_own(swept: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "older"
    shutil.copytree(swept, out)  # two seeds; the command below names none, and the default is now 5
    result = run_cli("sweep", str(data / "train.parquet"), *COMMON, *GRID[:4], "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "seeds 0, 1;" in result.stdout and not (out / "runs" / "none-0-seed2").exists()


def test_one_method_alone_is_never_adjusted_into_another_verdict() -> None:
    pair = paired([0.80, 0.82, 0.81], [0.70, 0.71, 0.74])
    pair.adjusted_p, pair.compared = 0.2, 1  # as if the p-value sat at the interval's edge
    assert pair.verdict() == "better"
