"""Task types end to end: regression beside binary tasks, labels missing for some rows, row weights; predictions in
the column's own units through predict, eval and the exported file; one clear line for each kind of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch

from mbtrain.data.batches import EncodedData
from mbtrain.tasks import TaskSet
from mbtrain.train import _losses
from tests.helpers import make_log, run_cli

FAST = ["--epochs", "2", "--batch-size", "32", "--threads", "1", "--hidden", "16", "--tower", "8", "--patience", "0"]
TASKS = ["--tasks", "watch,click,like"]
SKIP = ["--missing-labels", "skip"]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log") / "log.parquet"
    make_log(800, seed=1).write_parquet(path, row_group_size=100)
    return path


@pytest.fixture(scope="module")
def run(log: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mixed"
    result = run_cli("fit", str(log), *TASKS, *FAST, *SKIP, "--weight-column", "weight", "--balance", "metabalance",
                     "--epochs", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_inspect_shows_each_tasks_type_reason_and_coverage(log: Path) -> None:
    result = run_cli("inspect", str(log), *TASKS, "--weight-column", "weight")
    assert result.exit_code == 0, result.output
    assert "task watch (main): regression (numbers, not only 0/1), mean" in result.stdout
    assert "task click: binary (0/1), positive rate" in result.stdout
    like = next(line for line in result.stdout.splitlines() if line.startswith("task like"))
    clicks = int(make_log(800, seed=1)["click"].sum())
    assert f"labelled on {clicks / 800:.1%} of rows ({clicks:,})" in like
    assert "--weight-column" in result.stdout  # the weight column is no feature: excluded, and why
    assert "RMSE watch=" not in result.stdout


def test_a_mixed_run_reports_each_types_metrics_and_monitors_rmse(run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["monitor"] == "rmse"  # the main task is a regression
    watch, like = metrics["tasks"]["watch"], metrics["tasks"]["like"]
    assert {"rmse", "mae", "r2", "xauc"} <= set(watch) and "auc" not in watch
    assert watch["rows"] == metrics["valid_rows"]
    clicked = int(make_log(800, seed=1)["click"].sum())
    assert 0 < like["rows"] < metrics["valid_rows"] and like["rows"] <= clicked  # only the rows with a label
    assert 0.5 < watch["xauc"] <= 1.0 and math.isfinite(watch["r2"])  # it learned something of the target's order
    spec = torch.load(run / "checkpoints" / "best.pt", weights_only=False)["spec"]
    assert spec["task_types"]["watch"]["transform"] == "log1p"
    assert spec["task_types"]["click"] == {"type": "binary"}


def test_eval_rmse_is_sklearns_on_predicts_output_in_seconds(run: Path, log: Path, tmp_path: Path) -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    predicted = tmp_path / "pred.parquet"
    result = run_cli("predict", str(run), str(log), "--output", str(predicted), "--keep", "watch,like")
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(predicted)
    assert set(table.columns) == {"watch", "like", "pred_watch", "pred_click", "pred_like"}
    assert table["pred_watch"].min() >= 0.0 and table["pred_watch"].max() > 1.0  # seconds, not a standard score
    evaluated = run_cli("eval", str(run), str(log), "--json", str(tmp_path / "m.json"))
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "m.json").read_text())["tasks"]
    watch, pred = table["watch"].to_numpy(), table["pred_watch"].to_numpy()
    assert metrics["watch"]["rmse"] == pytest.approx(math.sqrt(mean_squared_error(watch, pred)), rel=1e-5)
    assert metrics["watch"]["mae"] == pytest.approx(mean_absolute_error(watch, pred), rel=1e-5)
    liked = table.filter(pl.col("like").is_not_null())
    assert metrics["like"]["rows"] == liked.height  # eval counts the rows with a label


@pytest.mark.parametrize("name", ["model.pt", "model.onnx"])
def test_the_exported_file_predicts_seconds_like_the_run(name: str, run: Path, log: Path, tmp_path: Path) -> None:
    if name.endswith(".onnx"):
        pytest.importorskip("onnxruntime")
    model = tmp_path / name
    exported = run_cli("export", str(run), "--output", str(model), "--format", "onnx" if "onnx" in name else
                       "torchscript")
    assert exported.exit_code == 0, exported.output
    ours, theirs = tmp_path / "run.csv", tmp_path / "export.csv"
    assert run_cli("predict", str(run), str(log), "--output", str(ours)).exit_code == 0
    assert run_cli("predict", str(model), str(log), "--output", str(theirs)).exit_code == 0
    for column in ("pred_watch", "pred_click"):
        torch.testing.assert_close(pl.read_csv(theirs)[column].to_torch(), pl.read_csv(ours)[column].to_torch(),
                                   rtol=1e-5, atol=1e-6)


def test_a_regression_run_resumes_and_streams(log: Path, tmp_path: Path) -> None:
    settings = [*TASKS, *FAST, *SKIP, "--exclude", "weight"]
    straight = run_cli("fit", str(log), *settings, "--out", str(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    first = run_cli("fit", str(log), *settings, "--epochs", "1", "--out", str(tmp_path / "split"))
    assert first.exit_code == 0, first.output
    resumed = run_cli("fit", "--resume", "--out", str(tmp_path / "split"), "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    one, two = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)
                for name in ("straight", "split"))
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, msg=name)
    streamed = run_cli("fit", str(log), *settings, "--memory-budget", "1K", "--out", str(tmp_path / "streamed"))
    assert streamed.exit_code == 0, streamed.output
    assert "streamed" in streamed.stdout
    assert json.loads((tmp_path / "streamed" / "metrics.json").read_text())["tasks"]["watch"]["rmse"] > 0


def test_losses_are_means_over_the_rows_with_a_label_weighed() -> None:
    """The fit loop's loss of a task: Σ weight·loss over the rows with its label ÷ Σ weight over them, whether the
    batch is whole or split between two ranks (each dividing by the global sum)."""
    tasks = TaskSet.fit({"watch": "regression", "like": "binary"}, _sums(), _settings(), "t")
    logits = torch.tensor([[0.5, 1.0], [-0.2, -1.0], [0.1, 0.3], [1.5, 2.0]])
    labels = torch.tensor([[3.0, 1.0], [0.0, float("nan")], [10.0, 0.0], [float("nan"), float("nan")]])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rows = tasks.row_losses(logits, labels)
    present = ~labels.isnan()
    expected = (rows * weights[:, None]).sum(0) / (present * weights[:, None]).sum(0)
    whole = _losses_of(tasks, logits, labels, weights, (present * weights[:, None]).sum(0))
    torch.testing.assert_close(whole, expected)
    denominators = (present * weights[:, None]).sum(0)
    halves = (_losses_of(tasks, logits[:2], labels[:2], weights[:2], denominators)
              + _losses_of(tasks, logits[2:], labels[2:], weights[2:], denominators))
    torch.testing.assert_close(halves, expected)
    assert rows[3].tolist() == [0.0, 0.0] and rows[1, 1] == 0.0  # a missing label adds nothing
    z = (math.log1p(3.0) - tasks.tasks[0].state["mean"]) / tasks.tasks[0].state["std"]
    assert float(rows[0, 0]) == pytest.approx((0.5 - z) ** 2)  # squared error on the log1p'd, standardised target


def _losses_of(tasks: TaskSet, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
               denominators: torch.Tensor) -> torch.Tensor:
    class Plain(torch.nn.Module):
        def auxiliary_losses(self, logits: torch.Tensor) -> None:
            return None

    batch = EncodedData(torch.empty(len(labels), 0, dtype=torch.int64), torch.empty(len(labels), 0), labels,
                        weights=weights)
    return _losses(Plain(), tasks, logits, batch, denominators, 4)


def _sums():  # noqa: ANN202
    from mbtrain.tasks import LabelSums

    return LabelSums.of(torch.tensor([[3.0, 1.0], [0.0, 0.0], [10.0, 1.0], [1.0, 0.0]]))


def _settings():  # noqa: ANN202
    from mbtrain.tasks import TaskSettings

    return TaskSettings({}, "mse")


@pytest.mark.parametrize(("frame_change", "flags", "fragments"), [
    (pl.col("user").alias("watch"), ["--task-type", "watch=regression"], ("'watch'", "regression", "numbers")),
    (pl.col("weight") - 2.0, ["--weight-column", "weight"], ("--weight-column", "'weight'", "-1")),
    (None, ["--funnel", "--tasks", "click,watch", "--missing-labels", "error"], ("'watch'", "regression", "funnel")),
    (None, ["--tasks", "click,watch", "--monitor", "rmse"], ("--monitor rmse", "'click'", "binary")),
    (None, ["--task-type", "watch=ordinal"], ("--task-type watch", "ordinal")),
    (None, ["--target-transform", "watch=log2"], ("--target-transform watch", "log2")),
    (None, ["--target-transform", "click=none"], ("--target-transform click=none", "binary")),
    (pl.col("watch") - 100.0, ["--target-transform", "watch=log1p"], ("--target-transform watch=log1p", "negative")),
    (None, ["--monitor", "gxauc"], ("--monitor gxauc", "--group-by")),
    (None, ["--tasks", "click,like", "--funnel"], ("--missing-labels skip", "funnel")),
    (pl.col("length").cast(pl.Int64).cast(pl.String).str.to_date("%d", strict=False).alias("day"),
     ["--tasks", "click,day", "--task-type", "day=multiclass"], ("'day'", "Date", "text or integers")),
    (pl.when(pl.col("like") == 1).then(pl.lit("b")).otherwise(pl.lit("c")).alias("a"),
     ["--tasks", "a,a_b,click", "--task-type", "a=multiclass"], ("'pred_a_b'",)),
])
def test_bad_task_input_is_one_line(frame_change: pl.Expr | None, flags: list[str], fragments: tuple[str, ...],
                                    tmp_path: Path) -> None:
    frame = make_log(200, seed=2).with_columns(pl.col("click").alias("a_b"))
    if frame_change is not None:
        frame = frame.with_columns(frame_change.alias(frame_change.meta.output_name()))
    path = tmp_path / "bad.parquet"
    frame.write_parquet(path)
    tasks = [] if "--tasks" in flags else TASKS
    result = run_cli("fit", str(path), *tasks, *FAST, *SKIP, *flags, "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbtrain: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def rated(rows: int, seed: int) -> pl.DataFrame:
    """make_log with a 1-5 rating (more stars for longer watches) and a mood among three words."""
    frame = make_log(rows, seed)
    stars = (pl.col("watch").rank("ordinal") * 5 / (rows + 1)).floor().cast(pl.Int64) + 1
    return frame.with_columns(stars.alias("rating"), pl.col("item").str.slice(1).cast(pl.Int64).mod(3)
                              .replace_strict({0: "sad", 1: "ok", 2: "glad"}).alias("mood"))


def test_a_multiclass_task_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "rated.parquet"
    rated(800, seed=4).write_parquet(path)
    out = tmp_path / "run"
    result = run_cli("fit", str(path), "--tasks", "rating,click,mood", "--task-type", "rating=multiclass",
                     "--task-type", "mood=multiclass", "--exclude", "watch,like,weight", *FAST, "--epochs", "3",
                     "--balance", "metabalance", "--out", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["monitor"] == "accuracy"
    assert set(metrics["tasks"]["rating"]) == {"accuracy", "logloss", "macro_auc", "rows"}
    predicted = tmp_path / "pred.parquet"
    assert run_cli("predict", str(out), str(path), "--output", str(predicted), "--keep", "rating").exit_code == 0
    table = pl.read_parquet(predicted)
    stars = [f"pred_rating_{k}" for k in range(1, 6)]
    assert table.columns == ["rating", *stars, "pred_rating", "pred_click", "pred_mood_glad", "pred_mood_ok",
                             "pred_mood_sad", "pred_mood"]
    probabilities = table.select(stars).to_torch()
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(len(table)))
    assert table["pred_rating"].to_list() == (probabilities.argmax(dim=1) + 1).tolist()
    evaluated = run_cli("eval", str(out), str(path), "--json", str(tmp_path / "m.json"))
    assert evaluated.exit_code == 0, evaluated.output
    accuracy = json.loads((tmp_path / "m.json").read_text())["tasks"]["rating"]["accuracy"]
    assert accuracy == pytest.approx(float((table["pred_rating"] == table["rating"]).mean()))
    model = tmp_path / "model.pt"
    assert run_cli("export", str(out), "--output", str(model)).exit_code == 0
    exported = tmp_path / "exported.parquet"
    assert run_cli("predict", str(model), str(path), "--output", str(exported)).exit_code == 0
    theirs = pl.read_parquet(exported)
    torch.testing.assert_close(theirs.select(stars).to_torch(), probabilities, rtol=1e-5, atol=1e-6)
    assert theirs["pred_mood"].to_list() == table["pred_mood"].to_list()


def test_multiclass_bad_input_is_one_line(tmp_path: Path) -> None:
    many = tmp_path / "many.parquet"
    make_log(1200, seed=5).with_columns(pl.int_range(pl.len()).alias("code")).write_parquet(many)
    result = run_cli("fit", str(many), "--tasks", "click,code", "--task-type", "code=multiclass", *FAST,
                     "--out", str(tmp_path / "run"))
    assert result.exit_code != 0 and result.stderr.count("\n") == 1
    assert "'code' has 1,200 classes; it takes at most 1,000" in result.stderr
    train, valid = tmp_path / "train.parquet", tmp_path / "valid.parquet"
    rated(300, seed=6).filter(pl.col("rating") < 5).write_parquet(train)
    rated(100, seed=7).write_parquet(valid)
    result = run_cli("fit", str(train), "--tasks", "click,rating", "--task-type", "rating=multiclass", "--valid",
                     str(valid), *FAST, "--out", str(tmp_path / "run"))
    assert result.exit_code != 0 and result.stderr.count("\n") == 1
    assert "valid.parquet: label column 'rating' holds the class 5, which is not one of the task's 4" in result.stderr
    assert not (tmp_path / "run").exists()


def test_weighted_metrics_count_a_row_of_weight_w_as_w_rows(run: Path, log: Path, tmp_path: Path) -> None:
    """eval --weighted-metrics (the run's --weight-column; weights 1 and 3 here) equals plain eval on the file with
    each row repeated its weight's times; without the flag, every row counts once."""
    frame = pl.read_parquet(log)
    repeated = tmp_path / "repeated.parquet"
    frame.select(pl.all().repeat_by(pl.col("weight").cast(pl.Int64)).explode()).write_parquet(repeated)
    weighted, plain, unweighted = tmp_path / "weighted.json", tmp_path / "plain.json", tmp_path / "unweighted.json"
    assert run_cli("eval", str(run), str(log), "--weighted-metrics", "--json", str(weighted)).exit_code == 0
    assert run_cli("eval", str(run), str(repeated), "--json", str(plain)).exit_code == 0
    assert run_cli("eval", str(run), str(log), "--json", str(unweighted)).exit_code == 0
    ours, theirs = (json.loads(path.read_text())["tasks"] for path in (weighted, plain))
    for task, metric in (("watch", "rmse"), ("watch", "xauc"), ("watch", "r2"), ("click", "auc"),
                         ("like", "logloss"), ("like", "pr_auc")):
        assert ours[task][metric] == pytest.approx(theirs[task][metric], rel=1e-9), (task, metric)
    assert json.loads(unweighted.read_text())["tasks"]["watch"]["rmse"] != pytest.approx(ours["watch"]["rmse"])
    model = tmp_path / "model.pt"
    assert run_cli("export", str(run), "--output", str(model)).exit_code == 0
    result = run_cli("eval", str(model), str(log), "--weighted-metrics")
    assert result.exit_code != 0 and "--weight-column" in result.stderr and result.stderr.count("\n") == 1
    named = run_cli("eval", str(model), str(log), "--weighted-metrics", "--weight-column", "weight")
    assert named.exit_code == 0, named.output


def test_nan_is_a_missing_label_and_validation_needs_no_weights(tmp_path: Path) -> None:
    """A float 0/1 column with NaN for "no label" is binary (inferred and read alike); a --valid file without the
    --weight-column trains, since validation's metrics are unweighted."""
    frame = make_log(400, seed=9).with_columns(pl.col("like").cast(pl.Float64).fill_null(float("nan")))
    train, valid = tmp_path / "train.parquet", tmp_path / "valid.parquet"
    frame.head(300).write_parquet(train)
    frame.tail(100).drop("weight").write_parquet(valid)
    inspected = run_cli("inspect", str(train), "--tasks", "like,click")
    assert "task like (main): binary (0/1)" in inspected.stdout, inspected.output
    result = run_cli("fit", str(train), "--tasks", "like,click", *FAST, *SKIP, "--weight-column", "weight",
                     "--valid", str(valid), "--exclude", "watch", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]["like"]
    assert metrics["rows"] == int(frame.tail(100)["like"].is_not_nan().sum())


def test_a_batch_without_a_tasks_label_takes_the_plain_sum(tmp_path: Path) -> None:
    """A task labelled on 3% of the rows is absent from most batches of 32: FAMO sees only the batches holding every
    task's label (otherwise its weights of the others collapse to ~1e-8 on the absent task's zero loss), and fit
    says so."""
    frame = make_log(1200, seed=11)
    sparse = pl.when(pl.int_range(pl.len()) % 33 == 0).then(pl.col("click")).otherwise(None).alias("rare")
    path = tmp_path / "rare.parquet"
    frame.with_columns(sparse).write_parquet(path)
    result = run_cli("fit", str(path), "--tasks", "click,rare", *FAST, *SKIP, "--exclude", "like,watch,weight",
                     "--balance", "famo", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "task 'rare' has a label on 3." in result.stderr and "takes the plain sum" in result.stderr
    last = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[-1])
    assert min(last["balance_weights"].values()) > 0.1, last["balance_weights"]
