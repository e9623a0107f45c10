"""Vocabularies of high-cardinality columns (an id column with millions of distinct values), on tiny data: the
encoders' lookups switch form with the vocabulary's size (data/encoders.py's _Lookup), sparse integer columns are
coded by sorting (data/coded.py), dictionaries of many chunks hashed at once; every form must give what a plain
dictionary of value → index gives, and the in-memory and streamed fits the same vocabulary."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mbtrain.data import encoders as encoders_module
from mbtrain.data.coded import CodedFrame, tensor_view
from mbtrain.data.encoders import BagEncoder, CategoricalEncoder, Encoders, NumericEncoder, table_slices
from mbtrain.data.io import read_coded
from mbtrain.data.schema import infer_schema
from mbtrain.data.stream import fit_encoders_streaming, infer_schema_streaming, row_groups, scan_row_groups
from tests.helpers import run_cli

TASKS = ["click", "purchase"]
FEATURES = ["user_id", "item", "hour"]


def _frame(rows: int = 3000, seed: int = 0) -> pl.DataFrame:
    """Sparse 64-bit user ids and text item ids, most seen once or twice, some null; a compact integer column."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(-(2**62), 2**62, rows // 2)
    users = pl.Series("user_id", ids[rng.integers(0, len(ids), rows)]).scatter(rng.integers(0, rows, 30), None)
    items = pl.Series("item", [f"i{v}" for v in rng.integers(0, rows, rows)]).scatter(rng.integers(0, rows, 30), None)
    click = (rng.random(rows) < 0.3).astype(np.int8)
    return pl.DataFrame([users, items, pl.Series("hour", rng.integers(0, 24, rows)),
                         pl.Series("price", rng.random(rows)), pl.Series("click", click),
                         pl.Series("purchase", click * (rng.random(rows) < 0.5))])


def _reference(values: list, column: pl.Series) -> list[int]:
    """Each row's index as a plain dictionary gives it: position + 1, 0 for null or unknown."""
    index = {value: i + 1 for i, value in enumerate(values)}
    return [0 if value is None else index.get(value, 0) for value in column.to_list()]


@pytest.fixture(params=["small", "large"])
def sizes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """"large": every text vocabulary looked up by hash and every binary search over sorted queries, as they are
    from ENUM_VALUES and SORT_QUERIES values on."""
    if request.param == "large":
        monkeypatch.setattr(encoders_module, "ENUM_VALUES", 0)
        monkeypatch.setattr(encoders_module, "SORT_QUERIES", 1)
    return request.param


def test_streamed_and_in_memory_fits_give_the_same_vocabulary_and_codes(tmp_path: Path, sizes: str) -> None:
    frame = _frame()
    path = tmp_path / "ids.parquet"
    frame.write_parquet(path, row_group_size=500)  # several row groups: text read as several dictionaries
    coded = read_coded([path], plain=TASKS)
    schema = infer_schema(coded, str(path), TASKS, categorical=FEATURES)
    fitted = Encoders.fit(coded, schema.categorical, schema.numeric, min_frequency=1)
    parts = row_groups([path])
    streamed_schema = infer_schema_streaming(parts, str(path), TASKS, categorical=FEATURES)
    assert [c.distinct for c in streamed_schema.columns] == [c.distinct for c in schema.columns]
    streamed = fit_encoders_streaming(scan_row_groups(parts), schema.categorical, schema.numeric, min_frequency=1)
    assert streamed.categorical == fitted.categorical
    users = fitted.categorical[0]
    assert users.cardinality == frame["user_id"].drop_nulls().n_unique() + 1
    counts = frame["user_id"].drop_nulls().value_counts(name="n").sort(["n", "user_id"], descending=[True, False])
    assert users.values == counts["user_id"].to_list()  # most frequent first, ties by value
    ours, _ = fitted.encode(coded, str(path))  # through the codes
    theirs, _ = streamed.encode(pl.read_parquet(path), str(path))  # through polars expressions, as a chunk
    assert torch.equal(ours, theirs)
    for j, encoder in enumerate(fitted.categorical):
        assert ours[:, j].tolist() == _reference(encoder.values, frame[encoder.name])


@pytest.mark.parametrize(("kind", "values", "column"), [
    ("str", ["b", "a", "zz", ""], ["a", None, "zz", "q", "", "b"]),
    ("int", [7, -3, 2**62, 0], [0, None, 2**62, 5, -3, 7]),  # sparse: a binary search
    ("int", [3, 1, 2], [2, None, 9, 1, -1, 3]),  # compact: a table
    ("float", [0.5, -1.0], [0.5, None, 2.0, -1.0]),
])
def test_every_lookup_form_maps_as_a_dictionary_does(kind: str, values: list, column: list, sizes: str) -> None:
    encoder = CategoricalEncoder("x", kind, values)
    series = pl.Series("x", column)
    assert pl.DataFrame([series]).select(encoder.expression()).to_series().to_list() == _reference(values, series)
    lookup = encoder.lookup(series.drop_nulls(), "f")  # a coded column's values, then its null id
    assert lookup.tolist() == [*_reference(values, series.drop_nulls()), 0]


def test_text_whose_hashes_collide_still_maps_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoders_module, "ENUM_VALUES", 0)
    monkeypatch.setattr(encoders_module, "_hashes",  # every value of a length shares a hash
                        lambda values: tensor_view(values.str.len_bytes().fill_null(0).cast(pl.Int64).to_numpy()))
    values = [f"v{i}" for i in range(50)]
    series = pl.Series("x", ["v3", "v49", None, "v50", "w1", "v0"])
    encoder = CategoricalEncoder("x", "str", values)
    assert pl.DataFrame([series]).select(encoder.expression()).to_series().to_list() == _reference(values, series)


def test_sparse_integers_are_coded_by_rank_with_nulls_last() -> None:
    ids = pl.Series("user_id", [2**61, None, -5, 2**61, 7, None, -5, -5], dtype=pl.Int64)
    column = CodedFrame(pl.DataFrame([ids])).column("user_id", "f")
    assert column.values.to_list() == [-5, 7, 2**61]
    assert column.totals.tolist() == [3, 1, 2, 2]  # the null id last
    assert column.distinct == 4  # null counted as one value, as polars' n_unique counts it
    assert column.counts(torch.tensor([0, 1, 2])).tolist() == [1, 0, 1, 1]


def test_vocabularies_save_as_lists_and_load_from_them() -> None:
    """The saved spec (checkpoints, exports) holds each vocabulary as a list, as release 0.1 wrote it."""
    encoders = Encoders([CategoricalEncoder("user_id", "int", pl.Series([5, 2**40, -1]))],
                        [NumericEncoder("price", 1.0, 2.0, False)], [BagEncoder("tags", "str", ["a", "b"], 50, 3)])
    saved = json.loads(json.dumps(encoders.to_dict()))
    assert saved["categorical"] == [{"name": "user_id", "kind": "int", "values": [5, 2**40, -1]}]
    assert saved["bags"] == [{"name": "tags", "kind": "str", "values": ["a", "b"], "max_bag": 50, "width": 3}]
    restored = Encoders.from_dict(saved)
    assert (restored.categorical, restored.bags) == (encoders.categorical, encoders.bags)
    assert restored.categorical[0].vocabulary.dtype == pl.Int64
    assert "<3>" in repr(restored.categorical[0])  # a vocabulary's size, never its ten million values
    restored.categorical[0].expression()  # its lookup made, which pickling (torchrun's hand-over) leaves behind
    assert pickle.loads(pickle.dumps(restored)).categorical == encoders.categorical
    with pytest.raises(ValueError, match="user_id"):
        CategoricalEncoder("user_id", "int", ["not", "integers"])


def test_table_slices_name_each_feature_s_rows_in_the_table_s_order() -> None:
    encoders = Encoders([CategoricalEncoder("user", "str", ["a", "b"]), CategoricalEncoder("hour", "int", [1])], [],
                        [BagEncoder("tags", "str", ["x", "y", "z"], 50, 2)])
    assert table_slices(encoders) == [("user", 3), ("hour", 2), ("tags", 4)]
    assert encoders.cardinalities == [3, 2, 4]


def test_fit_keeps_the_same_vocabulary_in_memory_and_streamed(tmp_path: Path) -> None:
    """Through the CLI: with --valid, both paths fit on every training row, so the checkpoints' vocabularies match."""
    train, valid = tmp_path / "train.parquet", tmp_path / "valid.parquet"
    _frame(2000, 0).write_parquet(train, row_group_size=400)
    _frame(300, 1).write_parquet(valid)
    vocabularies = []
    for budget in ("8G", "1K"):  # in memory, then streamed
        out = tmp_path / f"run-{budget}"
        result = run_cli("fit", str(train), "--valid", str(valid), "--tasks", ",".join(TASKS), "--categorical",
                         ",".join(FEATURES), "--min-frequency", "1", "--epochs", "1", "--memory-budget", budget,
                         "--out", str(out))
        assert result.exit_code == 0, result.output
        spec = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["spec"]
        vocabularies.append(spec["categorical"])
    assert vocabularies[0] == vocabularies[1]
    assert len(vocabularies[0][0]["values"]) == _frame(2000, 0)["user_id"].drop_nulls().n_unique()
