"""Vector columns (fixed-length lists or arrays of numbers): roles, per-element statistics, encoding, the saved
encoders, and the CLI end to end (in memory and streamed, eval, predict, the exported contract, bad input)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import Result

from mbtrain.data.encoders import Encoders
from mbtrain.data.schema import infer_schema
from mbtrain.data.stream import fit_encoders_streaming, parquet_files, row_groups, scan_row_groups
from mbtrain.errors import MbtrainError
from tests.helpers import make_frame, run_cli

NAN = float("nan")
SMALL = pl.DataFrame({
    "vec": pl.Series([[1.0, 2.0, 3.0], None, [4.0, None, NAN], [0.0, 1.0, 2.0]], dtype=pl.List(pl.Float32)),
    "arr": pl.Series([[1.0, 2.0], [3.0, 5.0], None, [5.0, 8.0]], dtype=pl.Array(pl.Float64, 2)),
    "ints": [[1, 2], [3, 4], [5, 6], [7, 8]],
    "x": [1.0, 2.0, 3.0, 4.0],
    "y": [0, 1, 0, 1],
})


def test_float_lists_and_arrays_are_vectors_of_standardised_elements() -> None:
    schema = infer_schema(SMALL, "f", ["y"], numeric=["ints"])
    roles = {c.name: (c.role, c.reason) for c in schema.columns}
    assert roles["vec"] == ("vector", "list of floats, length 3") and roles["arr"] == ("vector", "array of floats, "
                                                                                             "length 2")
    assert roles["ints"] == ("vector", "--numeric, length 2")  # without --numeric, a bag
    assert (schema.vectors, schema.numeric, schema.bags) == ({"vec": 3, "arr": 2, "ints": 2}, ["x"], [])
    assert infer_schema(SMALL, "f", ["y"]).bags == ["ints"]
    assert infer_schema(SMALL, "f", ["y"], numeric=["vec"]).columns[0].reason == "--numeric, length 3"
    assert infer_schema(SMALL, "f", ["y"], exclude=["vec"]).columns[0].role == "excluded"
    # fitted on rows 0-2: each element's mean and std over its non-null values (a NaN counts as null), no log1p
    encoders = Encoders.fit(SMALL, [], ["x"], 1, rows=torch.tensor([0, 1, 2]), vectors=schema.vectors)
    stats = {e.name: (e.mean, e.std, e.log1p) for e in encoders.numeric}
    assert list(stats) == ["x", "vec[0]", "vec[1]", "vec[2]", "arr[0]", "arr[1]", "ints[0]", "ints[1]"]
    assert stats["vec[0]"] == (2.5, 1.5, False) and stats["vec[1]"] == (2.0, 1.0, False)  # std 0: 1
    assert stats["arr[1]"] == (3.5, 1.5, False) and stats["ints[0]"] == (3.0, pytest.approx(math.sqrt(8 / 3)), False)
    _, numeric = encoders.encode(SMALL, "f")
    expected = torch.tensor([[1, 1, 2, 3, 1, 2, 1, 2], [2, NAN, NAN, NAN, 3, 5, 3, 4],
                             [3, 4, NAN, NAN, NAN, NAN, 5, 6], [4, 0, 1, 2, 5, 8, 7, 8]])
    torch.testing.assert_close(numeric, expected, equal_nan=True)
    saved = json.loads(json.dumps(encoders.to_dict()))
    assert saved["vectors"] == [{"name": "vec", "length": 3}, {"name": "arr", "length": 2},
                                {"name": "ints", "length": 2}]
    assert Encoders.from_dict(saved) == encoders
    older = {key: value for key, value in saved.items() if key != "vectors"}  # a run saved before vectors
    older["numeric"] = older["numeric"][:1]
    assert Encoders.from_dict(older) == Encoders([], encoders.numeric[:1])
    with pytest.raises(ValueError, match="vector columns' elements"):
        Encoders.from_dict({**saved, "numeric": saved["numeric"][:-1]})


def test_vectors_of_different_lengths_or_of_nothing() -> None:
    mixed = SMALL.with_columns(pl.Series("vec", [[1.0, 2.0, 3.0], None, [4.0], [1.0, 2.0, 3.0]]))
    with pytest.raises(MbtrainError, match=r"^f: vector column 'vec' holds lists of different lengths \(1 and 3\)"):
        infer_schema(mixed, "f", ["y"])
    assert infer_schema(mixed, "f", ["y"], exclude=["vec"]).vectors == {"arr": 2}
    empty = SMALL.with_columns(pl.Series("vec", [None] * 4, dtype=pl.List(pl.Float64)),
                               pl.Series("arr", [[]] * 4, dtype=pl.List(pl.Float64)))
    assert [(c.role, c.reason) for c in infer_schema(empty, "f", ["y"]).columns[:2]] == [
        ("excluded", "all values null"), ("excluded", "every list empty")]
    encoders = Encoders.fit(SMALL, [], [], 1, vectors={"vec": 3})
    with pytest.raises(MbtrainError, match="^g: vector column 'vec' has a list of 1 numbers, but the model was trained "
                                           "on lists of 3"):
        encoders.encode(mixed, "g")
    with pytest.raises(MbtrainError, match="'vec' is String, but the model was trained on it as a vector"):
        encoders.encode(SMALL.with_columns(pl.lit("a").alias("vec")), "g")


def vector_frame(rows: int, seed: int, array: bool = False) -> pl.DataFrame:
    """make_frame's funnel with an item vector of 4 floats whose first element carries the click; some lists null,
    some elements null or NaN."""
    rng = random.Random(seed)
    frame = make_frame(rows, seed)
    vectors = []
    for clicked in frame["click"]:
        vector = [3.0 * clicked + rng.gauss(0, 1), *(rng.gauss(5, 2) for _ in range(3))]
        if rng.random() < 0.1:
            vector[rng.randrange(4)] = None if rng.random() < 0.5 else NAN
        vectors.append(None if rng.random() < 0.05 else vector)
    dtype = pl.Array(pl.Float32, 4) if array else pl.List(pl.Float32)
    return frame.with_columns(pl.Series("item_vec", vectors, dtype=dtype))


@pytest.fixture(scope="module")
def vector_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vectors")
    for array in (False, True):
        kind = "array" if array else "list"
        vector_frame(600, 0, array).write_parquet(folder / f"train-{kind}.parquet", row_group_size=100)
        vector_frame(200, 1, array).write_parquet(folder / f"test-{kind}.parquet")
    return folder


def test_streamed_vector_statistics_equal_the_in_memory_ones(vector_files: Path) -> None:
    path = vector_files / "train-array.parquet"
    frame = pl.read_parquet(path)
    schema = infer_schema(frame, "f", ["purchase", "click"])
    assert schema.vectors == {"item_vec": 4}
    streamed = fit_encoders_streaming(scan_row_groups(row_groups(parquet_files(path))), [], schema.numeric, 1,
                                      vectors=schema.vectors)
    in_memory = Encoders.fit(frame, [], schema.numeric, 1, vectors=schema.vectors)
    assert streamed.vectors == in_memory.vectors
    for ours, theirs in zip(streamed.numeric, in_memory.numeric, strict=True):
        assert (ours.name, ours.log1p) == (theirs.name, theirs.log1p)
        assert (ours.mean, ours.std) == pytest.approx((theirs.mean, theirs.std), rel=1e-9)


FIT = ["--tasks", "purchase,click", "--epochs", "3", "--batch-size", "64", "--lr", "0.02", "--threads", "1",
       "--patience", "0", "--exclude", "row_id"]


@pytest.mark.parametrize(("kind", "budget"), [("list", []), ("list", ["--memory-budget", "1K"]),
                                               ("array", ["--memory-budget", "1K"])],
                         ids=["list-in-memory", "list-streamed", "array-streamed"])
def test_vectors_end_to_end(kind: str, budget: list[str], vector_files: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("fit", str(vector_files / f"train-{kind}.parquet"), *FIT, *budget, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert ("streamed" in result.stdout) == bool(budget)
    assert json.loads((out / "metrics.json").read_text())["tasks"]["click"]["auc"] > 0.9  # the vector carries it
    test = str(vector_files / f"test-{kind}.parquet")
    from_run, from_export, exported = tmp_path / "run.parquet", tmp_path / "export.parquet", tmp_path / "model.pt"
    assert run_cli("predict", str(out), test, "--output", str(from_run)).exit_code == 0
    assert run_cli("export", str(out), "--output", str(exported)).exit_code == 0
    assert run_cli("predict", str(exported), test, "--output", str(from_export)).exit_code == 0
    assert pl.read_parquet(from_run).equals(pl.read_parquet(from_export))
    evaluated = run_cli("eval", str(exported), test)
    assert evaluated.exit_code == 0, evaluated.output
    # the exported contract, fed by hand as a server without mbtrain would: the vector's elements after the scalars
    extra = {"mbtrain.json": ""}
    module = torch.jit.load(str(exported), _extra_files=extra)
    spec = json.loads(extra["mbtrain.json"])
    assert spec["vectors"] == [{"name": "item_vec", "length": 4}]
    assert [n["name"] for n in spec["numeric"]] == ["price", "rating", *(f"item_vec[{i}]" for i in range(4))]
    rows = pl.read_parquet(test).to_dicts()
    index = {c["name"]: {v: i + 1 for i, v in enumerate(c["values"])} for c in spec["categorical"]}
    categorical = torch.tensor([[index[c["name"]].get(row[c["name"]], 0) for c in spec["categorical"]]
                                for row in rows])
    numeric = torch.tensor([[NAN if row[n["name"]] is None else row[n["name"]] for n in spec["numeric"][:2]]
                            + [NAN if value is None else value for value in (row["item_vec"] or [None] * 4)]
                            for row in rows])
    assert numeric[:, 2:].isnan().any(1).sum() > 10  # null lists and elements among them
    with torch.no_grad():
        torch.testing.assert_close(module(categorical, numeric), torch.tensor(pl.read_parquet(from_run).to_numpy()),
                                   rtol=1e-5, atol=1e-6)


def test_inspect_shows_the_vector_role(vector_files: Path) -> None:
    for budget in ([], ["--memory-budget", "1K"]):
        result = run_cli("inspect", str(vector_files / "train-list.parquet"), "--tasks", "purchase,click", *budget)
        assert result.exit_code == 0, result.output
        lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
        assert lines["item_vec"].split("│")[3].strip() == "vector"  # the reason, wrapped here, is tested above


def assert_clean_error(result: Result, *fragments: str) -> None:
    """A non-zero exit with one `mbtrain: error:` line on stderr holding every fragment, and no traceback."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mbtrain: error:"), result.stderr
    assert all(fragment in result.stderr for fragment in fragments), result.stderr


def test_vectors_of_different_lengths_are_one_clear_line(vector_files: Path, tmp_path: Path) -> None:
    frame = vector_frame(300, 2)
    mixed = tmp_path / "mixed.parquet"
    frame.with_columns(pl.when(pl.int_range(pl.len()) == 7).then(pl.col("item_vec").list.head(3))
                       .otherwise(pl.col("item_vec")).alias("item_vec")).write_parquet(mixed, row_group_size=100)
    for budget in ([], ["--memory-budget", "1K"]):
        result = run_cli("fit", str(mixed), *FIT, *budget, "--out", str(tmp_path / "x"))
        assert_clean_error(result, str(mixed), "vector column 'item_vec' holds lists of different lengths (3 and 4)")
    out = tmp_path / "run"
    assert run_cli("fit", str(vector_files / "train-list.parquet"), *FIT, "--epochs", "1", "--out",
                   str(out)).exit_code == 0
    for command in (["predict", str(out), str(mixed), "--output", str(tmp_path / "p.parquet")],
                    ["eval", str(out), str(mixed)]):
        assert_clean_error(run_cli(*command), str(mixed), "vector column 'item_vec' has a list of 3 numbers, but the "
                                                          "model was trained on lists of 4")
