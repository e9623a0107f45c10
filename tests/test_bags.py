"""Bags (list columns): roles, vocabularies, slots, pooling, exact balancers over them, and the CLI end to end
(in memory and streamed, eval, predict, the exported contract, resume, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance import BALANCERS, Setup, build_balancer
from mbtrain.data.encoders import Encoders
from mbtrain.data.schema import infer_schema
from mbtrain.data.stream import fit_encoders_streaming, parquet_files, row_groups, scan_row_groups
from mbtrain.models import Inputs, ModelConfig, build_model
from mbtrain.models.embedding import FusedEmbedding
from tests.helpers import assert_split_metabalance_equals_full, dense, make_bag_frame, run_cli

TASKS = ["purchase", "click"]
SMALL = pl.DataFrame({
    "tags": [["a", "b"], ["b"], None, [], ["c", "a", "b", "d"], ["b", None]],
    "recent": [[1, 2, 3], [3], [4, 5], None, [1], [2]],
    "nested": [[["x"]], [], None, [["y"], []], [], []],
    "y": [0, 1, 0, 1, 0, 1],
}, schema_overrides={"nested": pl.List(pl.List(pl.String))})


def test_list_columns_are_bags_with_their_own_vocabularies_and_slots() -> None:
    schema = infer_schema(SMALL, "f", ["y"])
    roles = {c.name: (c.role, c.distinct, c.lengths) for c in schema.columns}
    assert roles["tags"] == ("bag", 4, (pytest.approx(9 / 6), 4)) and roles["recent"][0] == "bag"
    assert roles["nested"][0] == "excluded" and schema.bags == ["tags", "recent"]
    encoders = Encoders.fit(SMALL, schema.categorical, schema.numeric, 1, bags=schema.bags, max_bag=3)
    tags, recent = encoders.bags
    assert (tags.values, tags.width) == (["b", "a", "d"], 3)  # counted on the last 3 elements: c is cut off
    assert (recent.values, recent.width) == ([1, 2, 3, 4, 5], 3)  # ties by value
    categorical, _ = encoders.encode(SMALL, "f")
    assert categorical.shape == (6, 6)
    assert categorical[:, :3].tolist() == [[2, 1, -1], [1, -1, -1], [-1, -1, -1], [-1, -1, -1], [2, 1, 3], [1, 0, -1]]
    assert Encoders.from_dict(json.loads(json.dumps(encoders.to_dict()))) == encoders
    capped = Encoders.fit(SMALL, [], [], 1, bags=["tags"], max_bag=3, max_vocab=1)
    assert capped.bags[0].values == ["b"]
    short = Encoders.fit(pl.DataFrame({"tags": [["a"], ["b", "a"]]}), [], [], 1, bags=["tags"], max_bag=4)
    assert short.bags[0].width == 2  # the longest training list
    longer, _ = short.encode(pl.DataFrame({"tags": [["c", "b", "a", "b", "a"], ["a"]]}), "f")
    assert longer.tolist() == [[2, 1, 2, 1], [1, -1, -1, -1]]  # later data keeps up to --max-bag, not 2
    assert short.widened(longer[1:, :2], 4).tolist() == [[1, -1, -1, -1]]


def test_streamed_bag_encoders_equal_the_in_memory_ones(tmp_path: Path) -> None:
    frame = make_bag_frame(300, seed=4)
    frame.write_parquet(tmp_path / "d.parquet", row_group_size=70)
    schema = infer_schema(frame, "f", TASKS)
    parts = row_groups(parquet_files(tmp_path / "d.parquet"))
    for max_bag in (50, 5):
        streamed = fit_encoders_streaming(scan_row_groups(parts), schema.categorical, schema.numeric, 2,
                                          bags=schema.bags, max_bag=max_bag)
        in_memory = Encoders.fit(frame, schema.categorical, schema.numeric, 2, bags=schema.bags, max_bag=max_bag)
        assert (streamed.bags, streamed.categorical) == (in_memory.bags, in_memory.categorical)
    assert streamed.bags[1].width == 5


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_bags_pool_their_elements_and_an_empty_bag_is_the_unknown_row(pooling: str) -> None:
    embedding = FusedEmbedding([3, 4, 5], dim=2, bags=1, pooling=pooling)  # two columns, then a bag of 5 values
    table = embedding.table.weight
    categorical = torch.tensor([[1, 2, 3, 4, -1], [0, 0, -1, -1, -1], [2, 3, 0, 0, 2]])
    x = embedding(categorical)
    bag = table[7:]
    expected = [bag[[3, 4]], bag[[0]], bag[[0, 0, 2]]]
    for row, rows in enumerate(expected):
        pooled = rows.mean(0) if pooling == "mean" else rows.sum(0)
        torch.testing.assert_close(x[row, 4:], pooled)
        torch.testing.assert_close(x[row, :2], table[categorical[row, 0]])
    torch.testing.assert_close(embedding(categorical[:, :2]), embedding(torch.cat(  # no slots at all: empty
        [categorical[:, :2], torch.full((3, 1), -1)], 1)))
    assert embedding(categorical[:0]).shape == (0, 6)  # a rank's empty batch under torchrun


def bag_batch(step: int, rows: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two columns (cardinalities 5, 7) and two bags (6 and 9 values) of 4 slots, some empty; float64."""
    generator = torch.Generator().manual_seed(step)
    columns = torch.stack([torch.randint(0, 5, (rows,), generator=generator),
                           torch.randint(0, 7, (rows,), generator=generator)], 1)
    bags = []
    for values in (6, 9):
        lengths = torch.randint(0, 5, (rows, 1), generator=generator)
        slots = torch.randint(0, values, (rows, 4), generator=generator)
        bags.append(torch.where(torch.arange(4) < lengths, slots, -1))
    labels = (torch.rand(rows, 3, generator=generator) < torch.tensor([0.2, 0.5, 0.7])).double()
    return torch.cat([columns, *bags], 1), torch.randn(rows, 2, generator=generator, dtype=torch.double), labels


def bag_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name, embed_dim=4, hidden=[8, 6], experts=3, tower=[5], dropout=0.0),
                       Inputs([5, 7, 6, 9], num_numeric=2, num_tasks=3, bags=2)).double()


@pytest.mark.parametrize("name", ["mmoe", "shared-bottom", "ple", "esmm"])
def test_metabalance_over_bags_is_exact_with_each_bag_one_logical_tensor(name: str) -> None:
    full, fast = bag_model(name), bag_model(name)
    assert full.shared_segments()[0].bincount().tolist() == [5, 7, 6, 9]  # a bag's rows: one logical tensor
    batches = [bag_batch(step) for step in range(3)]
    assert_split_metabalance_equals_full(full, fast, batches, segments=full.shared_segments())


@pytest.mark.parametrize("balance", BALANCERS)
def test_every_balancer_trains_a_bag_model(balance: str) -> None:
    model = bag_model("mmoe")
    balancer = build_balancer(balance, Setup.of(model, num_tasks=3))
    categorical, numeric, labels = bag_batch(0)
    split = model.split_forward(categorical, numeric) if balancer.wants_split else None
    logits = split.logits if split is not None else model(categorical, numeric)
    balancer.backward(list(F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).unbind()),
                      split)
    grad = dense(model.embedding.table.weight.grad)
    assert torch.isfinite(grad).all() and grad[12:].abs().sum() > 0  # the bags' rows learn


@pytest.fixture(scope="module")
def bag_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bags")
    make_bag_frame(600, seed=0).write_parquet(folder / "train.parquet", row_group_size=100)
    make_bag_frame(200, seed=1).write_parquet(folder / "test.parquet")
    return folder


FIT = ["--tasks", "purchase,click", "--epochs", "3", "--batch-size", "64", "--lr", "0.02", "--threads", "1",
       "--patience", "0", "--exclude", "row_id", "--balance", "metabalance"]


@pytest.mark.parametrize("budget", [[], ["--memory-budget", "1K"]], ids=["in-memory", "streamed"])
def test_bags_end_to_end(budget: list[str], bag_files: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("fit", str(bag_files / "train.parquet"), *FIT, *budget, "--max-bag", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert ("streamed" in result.stdout) == bool(budget)
    test = str(bag_files / "test.parquet")
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]
    assert metrics["click"]["auc"] > 0.9  # the recent items carry the click
    from_run, from_export = tmp_path / "run.parquet", tmp_path / "export.parquet"
    assert run_cli("predict", str(out), test, "--output", str(from_run)).exit_code == 0
    exported = tmp_path / "model.pt"
    assert run_cli("export", str(out), "--output", str(exported)).exit_code == 0
    assert run_cli("predict", str(exported), test, "--output", str(from_export)).exit_code == 0
    assert pl.read_parquet(from_run).equals(pl.read_parquet(from_export))
    extra = {"mbtrain.json": ""}
    module = torch.jit.load(str(exported), _extra_files=extra)
    spec = json.loads(extra["mbtrain.json"])
    assert [b["name"] for b in spec["bags"]] == ["tags", "recent_items"] and spec["bags"][1]["width"] == 8
    rows = pl.read_parquet(test).head(5).to_dicts()  # encoded by hand, as a server without mbtrain would
    index = {c["name"]: {v: i + 1 for i, v in enumerate(c["values"])} for c in spec["categorical"] + spec["bags"]}
    categorical = torch.tensor([[index[c["name"]].get(row[c["name"]], 0) for c in spec["categorical"]]
                                for row in rows])
    numeric = torch.tensor([[float("nan") if row[n["name"]] is None else float(row[n["name"]])
                             for n in spec["numeric"]] for row in rows])
    bags = torch.full((5, 2, 20), -1)  # any padded length: here longer than the width
    for k, name in enumerate(["tags", "recent_items"]):
        for r, row in enumerate(rows):
            elements = (row[name] or [])[-8:]
            bags[r, k, : len(elements)] = torch.tensor([index[name].get(e, 0) for e in elements], dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(module(categorical, numeric, bags),
                                   torch.tensor(pl.read_parquet(from_run).head(5).to_numpy()), rtol=1e-5, atol=1e-6)
        nothing = module(categorical, numeric, torch.full((5, 2, 0), -1))  # length 0: every list empty
        torch.testing.assert_close(nothing, module(categorical, numeric, torch.full((5, 2, 3), -1)))
    evaluated = run_cli("eval", str(exported), test)
    assert evaluated.exit_code == 0, evaluated.output
    kept = run_cli("predict", str(out), test, "--output", str(tmp_path / "p.csv"), "--keep", "tags")
    assert kept.exit_code == 2 and "CSV cannot hold the list column 'tags'" in kept.stderr


def test_a_bag_run_resumes_exactly(bag_files: Path, tmp_path: Path) -> None:
    train = str(bag_files / "train.parquet")
    common = [*FIT[:2], "--batch-size", "64", "--patience", "0", "--exclude", "row_id", "--balance", "metabalance",
              "--pooling", "sum", "--dropout", "0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli("fit", train, *common, "--epochs", "3", "--out", str(straight)).exit_code == 0
    assert run_cli("fit", train, *common, "--epochs", "1", "--out", str(split)).exit_code == 0
    assert run_cli("fit", "--resume", "--out", str(split), "--epochs", "3").exit_code == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=0, atol=1e-6, msg=name)


def test_inspect_shows_bags(bag_files: Path) -> None:
    result = run_cli("inspect", str(bag_files / "train.parquet"), "--tasks", "purchase,click", "--max-bag", "5")
    assert result.exit_code == 0, result.output
    assert "bag recent_items: 60 distinct elements; lists of 6.3 on average, 12 at most; each row keeps its last 5 " \
        "(--max-bag)" in result.stdout
    assert "bag tags: 5 distinct elements" in result.stdout and "none longer than --max-bag 5" in result.stdout


def test_inspect_counts_what_max_vocab_drops_of_a_bag(bag_files: Path) -> None:
    for budget in ([], ["--memory-budget", "1K"]):
        result = run_cli("inspect", str(bag_files / "train.parquet"), "--tasks", "purchase,click", "--max-vocab",
                         "50", "--max-bag", "5", *budget)
        assert result.exit_code == 0, result.output
        assert "--max-vocab 50: bag recent_items drops 10 elements, whose" in result.stdout


def test_bad_bags_are_one_clear_line(bag_files: Path, tmp_path: Path) -> None:
    SMALL.write_parquet(tmp_path / "nested.parquet")
    result = run_cli("fit", str(tmp_path / "nested.parquet"), "--tasks", "y", "--categorical", "nested", "--out",
                     str(tmp_path / "n"))
    assert result.exit_code == 2 and "'nested' is List(List(String)) and cannot be --categorical" in result.stderr
    out = tmp_path / "run"
    frame = make_bag_frame(300, seed=2)
    frame.with_columns(pl.col("tags").list.first()).write_parquet(tmp_path / "scalar.parquet")
    assert run_cli("fit", str(tmp_path / "scalar.parquet"), *FIT, "--epochs", "1", "--out", str(out)).exit_code == 0
    result = run_cli("eval", str(out), str(bag_files / "test.parquet"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "'tags' is List(String), but the model was trained on it as one value per row" in result.stderr
    result = run_cli("fit", str(bag_files / "train.parquet"), "--tasks", "purchase", "--max-bag", "0", "--out",
                     str(tmp_path / "x"))
    assert result.exit_code == 2 and "--max-bag must be at least 1" in result.stderr
