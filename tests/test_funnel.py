"""The entire-space funnel (--funnel, --model esmm): the probabilities it makes, exact balancers on it, and the
CLI end to end (monotonic predictions, conditional columns and AUCs, the funnel-breaking error, export, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance.per_task import heads_backward
from mbtrain.models import Inputs, ModelConfig, build_model
from mbtrain.models.funnel import Funnel, conditional_probabilities
from mbtrain.models.scoring import ScoringModel
from tests.helpers import (
    FUNNEL_ORDER,
    assert_split_metabalance_equals_full,
    funnel_labels,
    identity_normalizer,
    make_frame,
    run_cli,
    seeded_batch,
)

CARDS = [5, 7, 3]
ORDER = FUNNEL_ORDER


def test_funnel_probabilities_are_the_products_down_the_funnel() -> None:
    conditional = torch.randn(50, 3, dtype=torch.double) * 6
    conditional[0] = torch.tensor([40.0, 40.0, 40.0])  # every stage all but certain: 1 − p below float32's eps
    conditional[1] = torch.tensor([3.0, -1.0, 120.0])  # a first stage past float32's log(tiny) passes as it is
    probabilities = torch.sigmoid(Funnel(ORDER).double()(conditional))
    given = torch.sigmoid(conditional)
    expected = torch.empty_like(given)
    expected[:, 2] = given[:, 2]
    expected[:, 0] = given[:, 2] * given[:, 0]
    expected[:, 1] = given[:, 2] * given[:, 0] * given[:, 1]
    torch.testing.assert_close(probabilities, expected, rtol=1e-9, atol=1e-12)
    assert (probabilities[:, 0] <= probabilities[:, 2]).all() and (probabilities[:, 1] <= probabilities[:, 0]).all()
    torch.testing.assert_close(conditional_probabilities(probabilities, ORDER), given, rtol=1e-9, atol=1e-12)
    assert Funnel(ORDER)(conditional.float())[1, 2] == 120.0


def funnel_model(name: str) -> ScoringModel:
    torch.manual_seed(0)
    network = build_model(ModelConfig(name, embed_dim=4, hidden=[8, 6], experts=3, tower=[5], dropout=0.0),
                          Inputs(CARDS, num_numeric=2, num_tasks=3))
    normalizer = identity_normalizer()
    return ScoringModel(normalizer, network, ORDER).double()


@pytest.mark.parametrize("name", ["mmoe", "shared-bottom", "ple", "esmm"])
def test_heads_give_each_task_its_own_gradient_at_the_boundary(name: str) -> None:
    """With the funnel a stage's loss reads every tower before it: each task's boundary gradient from the split
    forward is still that task's loss's gradient, as autograd gives it on the plain forward."""
    model = funnel_model(name)
    categorical, numeric, _ = seeded_batch(0, CARDS, rows=16)
    labels = funnel_labels(0, 16)
    split = model.split_forward(categorical, numeric)
    assert split.coupled
    torch.testing.assert_close(split.logits, model(categorical, numeric), rtol=1e-12, atol=1e-12)
    losses = list(F.binary_cross_entropy_with_logits(split.logits, labels, reduction="none").mean(0).unbind())
    head_grads, boundary_grads = heads_backward(losses, model.task_parameters(), split)
    plain = list(F.binary_cross_entropy_with_logits(model(categorical, numeric), labels, reduction="none")
                 .mean(0).unbind())
    shared = model.shared_parameters()
    for k, loss in enumerate(plain):  # through the trunk, task k's boundary gradient is its loss's gradient
        got = torch.autograd.grad(split.boundary, shared, [g[k] for g in boundary_grads], retain_graph=True,
                                  allow_unused=True)
        for g, want in zip(got, torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), strict=True):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(head_grads, torch.autograd.grad(sum(plain), model.task_parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mmoe", "shared-bottom", "ple", "esmm"])
def test_metabalance_on_a_funnel_equals_the_straightforward_one(name: str) -> None:
    """The split forward (heads task by task, trunk per task) against per-task autograd of the whole model."""
    batches = [(*seeded_batch(step, CARDS, rows=24)[:2], funnel_labels(step, 24)) for step in range(3)]
    full, fast = funnel_model(name), funnel_model(name)
    assert_split_metabalance_equals_full(full, fast, batches, segments=full.shared_segments())


def test_esmm_shares_only_the_embedding() -> None:
    model = build_model(ModelConfig("esmm", embed_dim=4, hidden=[8, 6], experts=3, tower=[5], dropout=0.0),
                        Inputs(CARDS, num_numeric=2, num_tasks=3))
    assert model.shared_parameters() == [model.embedding.table.weight]
    assert [layer.weight.shape for layer in model.towers.hidden.layers] == [(3, 14, 8), (3, 8, 6), (3, 6, 5)]


FIT = ["--tasks", "click,purchase", "--main-task", "purchase", "--epochs", "2", "--batch-size", "64",
       "--threads", "1", "--patience", "0"]


@pytest.mark.parametrize(("model", "balance"), [("esmm", "metabalance"), ("mmoe --funnel", "gradnorm"),
                                                ("ple --funnel", "multibalance")])
def test_funnel_runs_end_to_end(model: str, balance: str, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    name, *flags = model.split()
    result = run_cli("fit", str(data_dir / "train.parquet"), *FIT, "--model", name, *flags, "--balance", balance,
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "funnel click → purchase" in result.output
    assert json.loads((out / "config.json").read_text())["model"]["funnel"]  # esmm's too
    compared = run_cli("compare", str(out))
    assert compared.exit_code == 0 and "cond." in compared.stdout
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]
    assert metrics["purchase"]["conditional_on"] == "click"
    assert metrics["purchase"]["conditional_rows"] == metrics["click"]["positives"]
    assert 0 <= metrics["purchase"]["conditional_auc"] <= 1 and "conditional_auc" not in metrics["click"]
    predictions = tmp_path / "p.parquet"
    result = run_cli("predict", str(out), str(data_dir / "test.csv"), "--output", str(predictions),
                     "--conditional", "--keep", "click")
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(predictions)
    assert frame.columns == ["click", "pred_purchase", "pred_click", "cond_purchase", "cond_click"]
    assert (frame["pred_purchase"] <= frame["pred_click"]).all()
    assert (frame["cond_click"] == frame["pred_click"]).all()
    torch.testing.assert_close(torch.tensor(frame["cond_purchase"] * frame["pred_click"]),
                               torch.tensor(frame["pred_purchase"]), rtol=1e-5, atol=1e-7)
    exported = tmp_path / "model.pt"
    assert run_cli("export", str(out), "--output", str(exported)).exit_code == 0
    again = tmp_path / "again.parquet"
    assert run_cli("predict", str(exported), str(data_dir / "test.csv"), "--output", str(again),
                   "--conditional").exit_code == 0
    torch.testing.assert_close(torch.tensor(pl.read_parquet(again).to_numpy()),
                               torch.tensor(frame.drop("click").to_numpy()), rtol=1e-5, atol=1e-7)
    evaluated = tmp_path / "eval.json"
    assert run_cli("eval", str(exported), str(data_dir / "test.csv"), "--json", str(evaluated)).exit_code == 0
    assert "conditional_auc" in json.loads(evaluated.read_text())["tasks"]["purchase"]


@pytest.mark.parametrize("model", [["--model", "ple", "--task-experts", "2", "--levels", "3"],
                                   ["--model", "esmm"], ["--model", "shared-bottom", "--funnel"]])
def test_new_models_resume_exactly(model: list[str], data_dir: Path, tmp_path: Path) -> None:
    train = str(data_dir / "train.parquet")
    common = ["--tasks", "click,purchase", "--main-task", "purchase", "--batch-size", "64", "--patience", "0",
              "--dropout", "0.1", *model, "--balance", "metabalance"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli("fit", train, *common, "--epochs", "3", "--out", str(straight)).exit_code == 0
    assert run_cli("fit", train, *common, "--epochs", "1", "--out", str(split)).exit_code == 0
    result = run_cli("fit", "--resume", "--out", str(split), "--epochs", "3")
    assert result.exit_code == 0, result.output
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], rtol=0, atol=1e-6, msg=name)


def broken(folder: Path) -> pl.DataFrame:
    frame = make_frame(300, seed=2)
    rows = [150, 240, 241]  # row groups 1 and 2
    frame = frame.with_columns(pl.when(pl.col("row_id").is_in(rows)).then(1).otherwise(pl.col("purchase"))
                               .alias("purchase"),
                               pl.when(pl.col("row_id").is_in(rows)).then(0).otherwise(pl.col("click"))
                               .alias("click"))
    frame.write_parquet(folder / "broken.parquet", row_group_size=100)
    return frame


@pytest.mark.parametrize("streamed", [False, True])
def test_rows_that_break_the_funnel_are_one_clear_error(streamed: bool, tmp_path: Path) -> None:
    broken(tmp_path)
    budget = ["--memory-budget", "1K"] if streamed else []
    result = run_cli("fit", str(tmp_path / "broken.parquet"), *FIT, "--funnel", *budget, "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    line = result.stderr.strip()
    data = str(tmp_path / "broken.parquet")
    assert "\n" not in line and line.startswith(f"mbtrain: error: {data}: 3 row(s) break the funnel click → purchase")
    assert "the first is row index 150" in line and "click=0, purchase=1" in line
    assert not (tmp_path / "r").exists()
    plain = run_cli("fit", str(tmp_path / "broken.parquet"), *FIT, "--epochs", "1", "--out", str(tmp_path / "ok"))
    assert plain.exit_code == 0, plain.output  # without a funnel the same rows are fine


def test_conditional_needs_a_funnel_model(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_cli("fit", str(data_dir / "train.parquet"), *FIT, "--epochs", "1", "--out", str(out)).exit_code == 0
    result = run_cli("predict", str(out), str(data_dir / "test.csv"), "--output", str(tmp_path / "p.csv"),
                     "--conditional")
    assert result.exit_code == 2 and "has no funnel" in result.stderr
    one = run_cli("fit", str(data_dir / "train.parquet"), "--tasks", "click", "--model", "esmm", "--out",
                  str(tmp_path / "one"))
    assert one.exit_code == 2 and "--model esmm needs at least two tasks" in one.stderr


def test_inspect_shows_the_funnel_and_warns_of_rows_that_break_it(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli("inspect", str(data_dir / "train.parquet"), "--tasks", "click,purchase", "--funnel")
    assert result.exit_code == 0, result.output
    assert "funnel click → purchase: purchase | click" in result.stdout and not result.stderr
    broken(tmp_path)
    result = run_cli("inspect", str(tmp_path / "broken.parquet"), "--tasks", "click,purchase", "--funnel")
    assert result.exit_code == 0 and "3 row(s) break the funnel" in result.stderr and "fit refuses" in result.stderr


def test_a_toml_config_streams_a_ple_funnel(data_dir: Path, tmp_path: Path) -> None:
    """The new settings from a --config file, on the streamed path (a budget nothing fits in)."""
    data = tmp_path / "groups.parquet"
    make_frame(600, seed=3).write_parquet(data, row_group_size=100)
    config = tmp_path / "run.toml"
    config.write_text('tasks = "click,purchase"\nmain-task = "purchase"\nmodel = "ple"\nlevels = 3\n'
                      'task_experts = 2\nfunnel = true\nbalance = "pcgrad"\nepochs = 1\nmemory-budget = "1K"\n'
                      'exclude = "row_id"\n')
    out = tmp_path / "run"
    result = run_cli("fit", str(data), "--config", str(config), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "streamed" in result.stdout and "ple (3 levels, 8 shared + 2 per task experts) with funnel" in result.stdout
    saved = json.loads((out / "config.json").read_text())["model"]
    assert (saved["model"], saved["levels"], saved["task_experts"], saved["funnel"]) == ("ple", 3, 2, True)
    assert "conditional_auc" in json.loads((out / "metrics.json").read_text())["tasks"]["purchase"]
