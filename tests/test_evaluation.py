"""Validation and eval metrics through the CLI: GAUC over --group-by (in memory, streamed, eval), --monitor."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mbtrain.data.schema import group_keys
from mbtrain.errors import MbtrainError
from mbtrain.metrics import NULL_GROUP
from tests.helpers import make_frame, run_cli

COMMON = ["--tasks", "purchase,click", "--batch-size", "64", "--threads", "1"]
KEYS = {"auc", "logloss", "pr_auc", "calibration", "ne", "positives", "rows", "gauc", "gauc_rows"}


def _sklearn_gauc(frame: pl.DataFrame, score: str, label: str, group: str) -> float:
    total = weight = 0
    for part in frame.filter(pl.col(group).is_not_null()).partition_by(group):
        if 0 < part[label].sum() < part.height:
            total += roc_auc_score(part[label].to_numpy(), part[score].to_numpy()) * part.height
            weight += part.height
    return total / weight


def test_gauc_in_validation_and_eval_agree_with_sklearn_on_predictions(data_dir: Path, tmp_path: Path) -> None:
    valid = tmp_path / "valid.csv"
    frame = make_frame(300, seed=5).with_columns(
        pl.when(pl.col("row_id") % 13 == 0).then(None).otherwise(pl.col("user")).alias("user"))  # null keys
    frame.write_csv(valid)
    out = tmp_path / "run"
    result = run_cli("fit", str(data_dir / "train.parquet"), *COMMON, "--epochs", "2", "--valid", str(valid),
                     "--group-by", "user", "--out", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]["purchase"]) == KEYS
    target = tmp_path / "eval.json"
    result = run_cli("eval", str(out), str(valid), "--group-by", "user", "--json", str(target))
    assert result.exit_code == 0, result.output
    evaluated = json.loads(target.read_text())
    predictions = tmp_path / "predictions.parquet"
    assert run_cli("predict", str(out), str(valid), "--output", str(predictions), "--keep",
                   "user,purchase,click").exit_code == 0
    scored = pl.read_parquet(predictions)
    for task in ("purchase", "click"):
        expected = _sklearn_gauc(scored, f"pred_{task}", task, "user")
        assert evaluated["tasks"][task]["gauc"] == pytest.approx(expected, abs=1e-9)
        assert metrics["tasks"][task]["gauc"] == pytest.approx(expected, abs=1e-6)  # the best epoch is the one kept
        assert 0 < evaluated["tasks"][task]["gauc_rows"] < 1  # null keys and one-class users are left out
        assert evaluated["tasks"][task]["auc"] == pytest.approx(roc_auc_score(scored[task], scored[f"pred_{task}"]))
    assert "GAUC" in result.stdout
    plain = run_cli("eval", str(out), str(valid), "--json", str(target))
    assert plain.exit_code == 0 and "gauc" not in json.loads(target.read_text())["tasks"]["click"]


def test_streamed_validation_carries_group_keys(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for seed in range(3):
        make_frame(200, seed).write_parquet(folder / f"part-{seed}.parquet", row_group_size=50)
    out = tmp_path / "run"
    result = run_cli("fit", str(folder), *COMMON, "--epochs", "1", "--memory-budget", "1K", "--group-by", "user",
                     "--monitor", "gauc", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "streamed" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["monitor"] == "gauc" and metrics["tasks"]["purchase"]["gauc"] is not None


@pytest.mark.parametrize("monitor", ["logloss", "ne"])
def test_monitor_picks_the_best_epoch_by_its_metric(data_dir: Path, tmp_path: Path, monitor: str) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'monitor = "{monitor}"\npatience = 0\nlr = 0.03\n')
    out = tmp_path / "run"
    result = run_cli("fit", str(data_dir / "train.parquet"), *COMMON, "--epochs", "5", "--config", str(config),
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    values = [row["valid"]["purchase"][monitor] for row in history]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["monitor"] == monitor
    assert metrics["best_epoch"] == 1 + values.index(min(values))
    assert f"purchase {monitor}" in result.stdout  # the epoch lines show the monitored metric


@pytest.mark.parametrize(("args", "message"), [
    (["--monitor", "gauc"], "--monitor gauc needs --group-by"),
    (["--monitor", "recall"], "--monitor 'recall' is not supported"),
    (["--group-by", "nobody"], "--group-by column 'nobody' not found"),
])
def test_bad_evaluation_flags_are_one_line(data_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("fit", str(data_dir / "train.parquet"), *COMMON, *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("mbtrain: error:")


def test_eval_group_by_missing_column_is_one_line(trained_run: Path, data_dir: Path) -> None:
    result = run_cli("eval", str(trained_run), str(data_dir / "test.csv"), "--group-by", "session")
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"mbtrain: error: {data_dir / 'test.csv'}: --group-by column 'session' not "
                                     "found; columns are row_id, user, device, hour, price, rating, click, purchase")


def test_group_keys_are_the_values_not_per_chunk_category_codes() -> None:
    """A categorical column's codes differ between chunks read apart (streamed row groups): keys hash the text."""
    first = pl.DataFrame({"user": pl.Series(["a", "b"], dtype=pl.Categorical)})
    second = pl.DataFrame({"user": pl.Series(["b", "c", None], dtype=pl.Categorical)})
    keys = torch.cat([group_keys(first, "f", "user"), group_keys(second, "f", "user")])
    text = group_keys(pl.DataFrame({"user": ["a", "b", "b", "c", None]}), "f", "user")
    assert torch.equal(keys, text) and keys[1] == keys[2] and keys[4] == NULL_GROUP
    with pytest.raises(MbtrainError, match="--group-by column 'tags' holds List"):
        group_keys(pl.DataFrame({"tags": [[1, 2], [3]]}), "f", "tags")
