"""The embedding table's gradient as the batch's touched rows (mbtrain/table.py) and the table optimizers
(mbtrain/optim.py): nothing table-sized per step, lazy-adam equal to Adam where every row is touched, row-wise
Adagrad against its formula, untouched rows left alone, --table-optimizer through the CLI and resumed exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mbtrain.balance import BALANCERS, Setup, build_balancer
from mbtrain.models import Inputs, ModelConfig, build_model
from mbtrain.optim import TABLE_OPTIMIZERS, LazyAdam, RowwiseAdagrad, TrainOptimizer
from mbtrain.table import rows_gradient, touched
from tests.helpers import losses_of, make_frame, run_cli, seeded_batch

CARDS = [400, 300, 300]  # 1,000 table rows; a batch of 8 touches at most 24


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig("mmoe", embed_dim=4, hidden=[8], experts=2, tower=[4]),
                       Inputs(CARDS, num_numeric=2, num_tasks=3))


@pytest.mark.parametrize("balance", ["none", "metabalance", "pcgrad", "gradnorm", "uncertainty"])
def test_a_steps_table_gradient_holds_only_the_batchs_rows(balance: str) -> None:
    model = _model()
    balancer = build_balancer(balance, Setup.of(model, 3))
    categorical, numeric, labels = seeded_batch(0, CARDS, rows=8, rates=(0.3, 0.3, 0.3))
    numeric = numeric.float()
    split = model.split_forward(categorical, numeric) if balancer.wants_split else None
    logits = split.logits if split is not None else model(categorical, numeric)
    balancer.backward(losses_of(logits, labels.float()), split)
    grad = model.embedding.table.weight.grad
    assert grad.is_sparse
    rows, values = touched(grad)
    expected = torch.unique(categorical + model.embedding.offsets)
    assert torch.equal(rows, expected)
    assert values.shape == (expected.numel(), 4) and values.abs().sum() > 0


def test_lazy_adam_is_adam_where_every_row_is_touched() -> None:
    torch.manual_seed(1)
    ours, theirs = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3)
    theirs = theirs.copy_(ours.detach()).requires_grad_()
    lazy = LazyAdam([ours], lr=0.05, weight_decay=0.01)
    adam = torch.optim.Adam([theirs], lr=0.05, weight_decay=0.01)
    for _ in range(5):
        grad = torch.randn(6, 3)
        ours.grad = rows_gradient(ours, torch.arange(6), grad.clone())
        theirs.grad = grad
        lazy.step()
        adam.step()
    torch.testing.assert_close(ours, theirs)


def test_lazy_adam_and_rowwise_adagrad_leave_untouched_rows_alone() -> None:
    for kind in (LazyAdam, RowwiseAdagrad):
        table = torch.randn(10, 3, requires_grad=True)
        before = table.detach().clone()
        optimizer = kind([table], lr=0.1)
        for _ in range(3):
            table.grad = rows_gradient(table, torch.tensor([2, 7]), torch.randn(2, 3))
            optimizer.step()
        others = [r for r in range(10) if r not in (2, 7)]
        assert torch.equal(table.detach()[others], before[others]), kind.__name__
        assert not torch.equal(table.detach()[[2, 7]], before[[2, 7]]), kind.__name__
        state = optimizer.state[table]
        rows_of_state = state["moments"].transpose(0, 1) if "moments" in state else state["sum"]  # row first
        assert not rows_of_state[others].any(), kind.__name__


def test_rowwise_adagrad_follows_its_formula() -> None:
    torch.manual_seed(2)
    table = torch.randn(5, 4, requires_grad=True)
    literal = table.detach().clone()
    accumulator = [0.0] * 5
    optimizer = RowwiseAdagrad([table], lr=0.2, eps=1e-8)
    for step in range(4):
        rows = torch.tensor([0, 3]) if step % 2 else torch.tensor([1, 3, 4])
        grad = torch.randn(rows.numel(), 4)
        table.grad = rows_gradient(table, rows, grad)
        optimizer.step()
        for at, row in enumerate(rows.tolist()):
            accumulator[row] += float(grad[at].square().mean())
            literal[row] -= 0.2 * grad[at] / (math.sqrt(accumulator[row]) + 1e-8)
    torch.testing.assert_close(table.detach(), literal)
    assert optimizer.state[table]["sum"].shape == (5,)  # one float a row: 1/dim of Adam's state


def test_duplicate_rows_are_summed_before_the_step() -> None:
    """An uncoalesced gradient (the plain backward's: one entry per lookup) steps as its rows' sums."""
    table = torch.zeros(4, 2, requires_grad=True)
    optimizer = RowwiseAdagrad([table], lr=1.0)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), torch.tensor([[1.0, 1.0], [2.0, 2.0],
                                                                                  [4.0, 4.0]]), (4, 2))
    optimizer.step()
    torch.testing.assert_close(table.detach()[1], torch.tensor([-1.0, -1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(table.detach()[3], torch.tensor([-1.0, -1.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("table_optimizer", TABLE_OPTIMIZERS)
def test_every_table_optimizer_trains_the_table_and_the_rest(table_optimizer: str) -> None:
    model = _model()
    optimizer = TrainOptimizer(model.parameters(), table_optimizer, lr=0.05, weight_decay=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    balancer = build_balancer("metabalance", Setup.of(model, 3))
    table = model.embedding.table.weight
    for step in range(3):
        categorical, numeric, labels = seeded_batch(step, CARDS, rows=8, rates=(0.3, 0.3, 0.3))
        split = model.split_forward(categorical, numeric.float())
        last = table.detach().clone()
        optimizer.zero_grad()
        balancer.backward(losses_of(split.logits, labels.float()), split)
        optimizer.step()
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "embedding.table.weight" in moved and len(moved) > 1
    # the last step: dense Adam moves every row its moments have seen, the others the batch's rows alone
    stepped = (table.detach() != last).any(dim=1)
    touched_now = torch.zeros_like(stepped)
    touched_now[(categorical + model.embedding.offsets).reshape(-1)] = True
    assert bool((stepped & ~touched_now).any()) == (table_optimizer == "adam")


@pytest.mark.parametrize("balance", [name for name, kind in BALANCERS.items() if "parameters" in kind.levels])
def test_every_per_task_balancer_steps_lazily(balance: str) -> None:
    """With a lazy table optimizer no balancer's gradient reaches a row its batch did not touch (DB-MTL's moving
    averages excepted: they reach every row they have seen)."""
    model = _model()
    balancer = build_balancer(balance, Setup.of(model, 3))
    optimizer = TrainOptimizer(model.parameters(), "lazy-adam", lr=0.05, weight_decay=0.0,
                               balancer_params=balancer.parameters())
    before = model.embedding.table.weight.detach().clone()
    seen = torch.zeros(sum(CARDS), dtype=torch.bool)
    for step in range(2):
        categorical, numeric, labels = seeded_batch(step, CARDS, rows=8, rates=(0.3, 0.3, 0.3))
        seen[(categorical + model.embedding.offsets).reshape(-1)] = True
        split = model.split_forward(categorical, numeric.float()) if balancer.wants_split else None
        logits = split.logits if split is not None else model(categorical, numeric.float())
        optimizer.zero_grad()
        balancer.backward(losses_of(logits, labels.float()), split)
        optimizer.step()
    moved = (model.embedding.table.weight.detach() != before).any(dim=1)
    assert not (moved & ~seen).any()


def test_the_table_optimizer_is_a_setting_resumed_exactly(tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(400, seed=1).write_parquet(data)
    common = ["--tasks", "purchase,click", "--balance", "metabalance", "--hidden", "8", "--experts", "2",
              "--tower", "4", "--batch-size", "64", "--patience", "0", "--seed", "2", "--min-frequency", "1",
              "--table-optimizer", "rowwise-adagrad", "--table-lr", "0.05"]
    result = run_cli("fit", str(data), *common, "--epochs", "2", "--out", str(tmp_path / "straight"))
    assert result.exit_code == 0, result.output
    result = run_cli("fit", str(data), *common, "--epochs", "1", "--out", str(tmp_path / "split"))
    assert result.exit_code == 0, result.output
    result = run_cli("fit", "--resume", "--out", str(tmp_path / "split"), "--epochs", "2")
    assert result.exit_code == 0, result.output
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(split["model"][name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(split["optimizer"]["table"]["state"], straight["optimizer"]["table"]["state"],
                               rtol=0, atol=0)
    saved = json.loads((tmp_path / "split" / "config.json").read_text())
    assert saved["train"]["table_optimizer"] == "rowwise-adagrad" and saved["train"]["table_lr"] == 0.05


def test_a_bad_table_optimizer_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(100, seed=1).write_parquet(data)
    result = run_cli("fit", str(data), "--tasks", "purchase,click", "--table-optimizer", "sgd", "--out",
                     str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "--table-optimizer" in result.output and "Traceback" not in result.output
    result = run_cli("fit", str(data), "--tasks", "purchase,click", "--table-lr", "0", "--out",
                     str(tmp_path / "run"))
    assert result.exit_code == 2 and "--table-lr must be positive" in result.output
    result = run_cli("fit", str(data), "--tasks", "purchase,click", "--table-optimizer", "adam", "--table-lr", "0.1",
                     "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--table-lr needs --table-optimizer lazy-adam or rowwise-adagrad" in result.output


def test_the_batched_full_backward_without_a_table() -> None:
    """MetaBalance from Python over parameters none of which is an embedding table, its backward batched."""
    from mbtrain.balance import MetaBalance

    torch.manual_seed(0)
    shared, heads = torch.randn(3, 2, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    losses = list(((torch.randn(5, 3) @ shared) * heads.sum(0)).square().mean(0).unbind())
    balancer = MetaBalance([shared])
    balancer.batched = True
    balancer.backward(losses)
    assert shared.grad is not None and heads.grad is not None and torch.isfinite(shared.grad).all()


def test_inspect_and_the_run_summary_say_each_columns_table_slice(tmp_path: Path) -> None:
    import polars as pl

    data = tmp_path / "ids.parquet"
    rows = 400
    pl.DataFrame({"ad": [f"a{i % 40}" for i in range(rows)], "device": [f"d{i % 3}" for i in range(rows)],
                  "purchase": [int(i % 7 == 0) for i in range(rows)], "click": [int(i % 3 == 0) for i in range(rows)]}
                 ).write_parquet(data)
    result = run_cli("inspect", str(data), "--tasks", "purchase,click")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # 40 ads and 3 devices, each seen often enough, plus each column's unknown row; lazy-adam: 2 floats a float
    assert "ad 41 rows 1.3 KiB + 2.6 KiB" in text and "device 4 rows 128 B + 256 B" in text, text
    result = run_cli("fit", str(data), "--tasks", "purchase,click", "--epochs", "1", "--table-optimizer",
                     "rowwise-adagrad", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "rowwise-adagrad state" in text and "ad 41 rows 1.3 KiB + 164 B" in text, text
