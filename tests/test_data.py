"""Schema inference, label parsing and encoders (unseen values, nulls, rare values, round-trip)."""

from __future__ import annotations

import json
import math

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mbtrain.data.batches import EncodedData
from mbtrain.data.coded import CodedFrame
from mbtrain.data.encoders import Encoders, capped_rows
from mbtrain.data.io import read_coded
from mbtrain.data.labels import LabelColumns
from mbtrain.data.schema import infer_schema
from mbtrain.errors import MbtrainError
from tests.helpers import make_frame


def test_roles_are_inferred_and_overridable() -> None:
    frame = make_frame(300).with_columns(
        pl.Series("item_id", [i % 97 for i in range(300)]),
        pl.Series("age", [18 + i % 60 for i in range(300)]),
        pl.Series("is_new", [i % 2 == 0 for i in range(300)]),
    )
    schema = infer_schema(frame, "f", ["purchase", "click"])
    roles = {c.name: c.role for c in schema.columns}
    assert roles == {
        "row_id": "excluded",  # all distinct
        "user": "categorical",  # text
        "device": "categorical",
        "hour": "categorical",  # small integer code
        "price": "numeric",
        "rating": "numeric",
        "click": "label",
        "purchase": "label",
        "item_id": "categorical",  # id-like name
        "age": "categorical+numeric",  # moderate integer cardinality: both
        "is_new": "categorical",
    }
    assert "age" in schema.categorical and "age" in schema.numeric
    overridden = infer_schema(frame, "f", ["click"], categorical=["rating"], numeric=["hour"], exclude=["user"])
    roles = {c.name: c.role for c in overridden.columns}
    assert (roles["rating"], roles["hour"], roles["user"]) == ("categorical", "numeric", "excluded")
    assert roles["purchase"] == "categorical"  # not a task here, so a small integer feature


def test_labels_accept_ints_bools_and_true_false_text() -> None:
    frame = pl.DataFrame({"a": [0, 1, 1], "b": [True, False, True], "c": ["true", "FALSE", "1"]})
    labels = LabelColumns(["a", "b", "c"], ["binary"] * 3).read(frame, "f")
    assert labels.tolist() == [[0, 1, 1], [1, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [([0, 1, 2], "not binary"), ([0.0, 0.5, 1.0], "not binary"), ([0, None, 1], "missing value.*--missing-labels"),
     (["yes", "no", "yes"], "text")],
)
def test_bad_labels_name_the_column(values: list, fragment: str) -> None:
    with pytest.raises(MbtrainError, match=rf"f: label column 'y' .*{fragment}"):
        LabelColumns(["y"], ["binary"]).read(pl.DataFrame({"y": values}), "f")


def test_categorical_encoder_unseen_null_and_rare_share_index_zero() -> None:
    train = pl.DataFrame({"city": ["a", "a", "b", "b", "b", "rare", None], "n": [1.0, 2.0, None, 4.0, 5, 6, 7]})
    encoders = Encoders.fit(train, ["city"], ["n"], min_frequency=2)
    assert encoders.categorical[0].values == ["b", "a"]  # by frequency
    assert encoders.cardinalities == [3]
    test = pl.DataFrame({"city": ["a", "b", "never-seen", None, "rare"], "n": [None, 1.0, float("nan"), 2, 3]})
    categorical, numeric = encoders.encode(test, "t")
    assert categorical[:, 0].tolist() == [2, 1, 0, 0, 0]
    assert math.isnan(numeric[0, 0]) and math.isnan(numeric[2, 0]) and numeric[1, 0] == 1.0


def test_encoders_cast_types_between_files_and_round_trip_json() -> None:
    train = pl.DataFrame({"code": [10, 10, 20, 20], "x": [1.0, 2.0, 3.0, 4.0]})
    encoders = Encoders.fit(train, ["code"], ["x"], min_frequency=1)
    restored = Encoders.from_dict(json.loads(json.dumps(encoders.to_dict())))
    as_text = pl.DataFrame({"code": ["20", "10", "30", "oops"], "x": [1, 2, 3, 4]})  # CSV read as text / ints
    categorical, numeric = restored.encode(as_text, "t")
    assert categorical[:, 0].tolist() == [encoders.categorical[0].values.index(v) + 1 if v else 0
                                          for v in (20, 10, None, None)]
    assert numeric.dtype == torch.float32 and numeric[:, 0].tolist() == [1, 2, 3, 4]


def test_skewed_non_negative_numbers_are_logged() -> None:
    frame = pl.DataFrame({"gain": [0.0] * 95 + [5000.0, 10000.0, 99999.0, 3000.0, 7000.0],
                          "temp": [float(i) for i in range(100)]})
    encoders = Encoders.fit(frame, [], ["gain", "temp"], min_frequency=1)
    assert [e.log1p for e in encoders.numeric] == [True, False]


def test_missing_feature_column_is_named() -> None:
    encoders = Encoders.fit(pl.DataFrame({"a": ["x"], "b": [1.0]}), ["a"], ["b"], min_frequency=1)
    with pytest.raises(MbtrainError, match="t: feature column 'b'"):
        encoders.encode(pl.DataFrame({"a": ["x"]}), "t")


def test_id_like_names() -> None:
    rows = 300
    frame = pl.DataFrame({name: [i % 150 for i in range(rows)] for name in ("userId", "bid", "amount_paid", "shop_key")}
                         ).with_columns(pl.Series("y", [i % 2 for i in range(rows)]))
    roles = {c.name: c.role for c in infer_schema(frame, "f", ["y"]).columns}
    assert roles["userId"] == roles["shop_key"] == "categorical"
    assert roles["bid"] == roles["amount_paid"] == "categorical+numeric"  # not ids: ends in 'id' by chance


def test_boolean_categories_match_text_read_from_csv() -> None:
    encoders = Encoders.fit(pl.DataFrame({"flag": [True, False, True, True]}), ["flag"], [], min_frequency=1)
    as_bool, _ = encoders.encode(pl.DataFrame({"flag": [True, False, None]}), "t")
    as_text, _ = encoders.encode(pl.DataFrame({"flag": ["true", "false", "yes"]}), "t")
    assert as_bool[:, 0].tolist() == [1, 2, 0]
    assert as_text[:, 0].tolist() == [1, 2, 0]


def test_a_label_cannot_be_excluded() -> None:
    with pytest.raises(MbtrainError, match="'y' is a task label"):
        infer_schema(pl.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}), "f", ["y"], exclude=["y"])


def test_fitting_on_some_rows_equals_fitting_on_a_copy_of_them() -> None:
    frame = make_frame(400, seed=7).with_columns(
        pl.Series("code", [None if i % 11 == 0 else i % 37 for i in range(400)]),
        pl.Series("flag", [i % 3 == 0 for i in range(400)]),
    )
    rows = torch.randperm(400, generator=torch.Generator().manual_seed(1))[:300]
    categorical, numeric = ["user", "device", "code", "flag", "hour"], ["price", "rating"]
    subset = Encoders.fit(frame, categorical, numeric, min_frequency=3, rows=rows)
    copied = Encoders.fit(frame[rows.numpy()], categorical, numeric, min_frequency=3)
    assert subset.categorical == copied.categorical
    for ours, theirs in zip(subset.numeric, copied.numeric, strict=True):
        assert (ours.name, ours.log1p) == (theirs.name, theirs.log1p)
        assert ours.mean == pytest.approx(theirs.mean) and ours.std == pytest.approx(theirs.std)


@pytest.mark.parametrize(("categorical", "numeric"), [(["user"], []), ([], ["price"])])
def test_fitting_on_some_rows_with_one_kind_of_column(categorical: list[str], numeric: list[str]) -> None:
    frame = make_frame(100, seed=2)
    fitted = Encoders.fit(frame, categorical, numeric, min_frequency=1, rows=torch.arange(80))
    assert len(fitted.categorical) == len(categorical) and len(fitted.numeric) == len(numeric)


def _mixed_frame(rows: int) -> pl.DataFrame:
    """Every kind the coded path handles: text with nulls, ints with nulls, a wide-range int, booleans, text labels."""
    return make_frame(rows, seed=4).with_columns(
        pl.Series("city", [None if i % 13 == 0 else f"c{(i * 7) % 23}" for i in range(rows)]),
        pl.Series("shop_id", [None if i % 17 == 0 else 5 + (i * 11) % 97 for i in range(rows)]),
        pl.Series("hash_id", [(i % 41) * 10**15 for i in range(rows)]),  # too wide a range to be its own id
        pl.Series("is_new", [i % 3 == 0 for i in range(rows)]),
        pl.Series("purchase", ["true" if i % 5 == 0 else "false" for i in range(rows)]),
    )


def test_parquet_text_read_as_dictionaries_gives_what_the_plain_frame_gives(tmp_path) -> None:
    frame = _mixed_frame(400)
    path = tmp_path / "mixed.parquet"
    frame.write_parquet(path, row_group_size=64)  # several row groups, each with its own dictionaries
    tasks = ["purchase", "click"]
    coded = read_coded([path], plain=tasks)
    assert coded.columns == frame.columns and coded.schema == frame.schema
    schema = infer_schema(coded, "f", tasks)
    assert schema == infer_schema(frame, "f", tasks)
    rows = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:300]
    fitted = Encoders.fit(coded, schema.categorical, schema.numeric, min_frequency=2, rows=rows)
    plain = Encoders.fit(frame, schema.categorical, schema.numeric, min_frequency=2, rows=rows)
    assert fitted.categorical == plain.categorical
    for ours, theirs in zip(fitted.numeric, plain.numeric, strict=True):  # summed over chunks: last-bit differences
        assert (ours.name, ours.log1p) == (theirs.name, theirs.log1p) and ours.mean == pytest.approx(theirs.mean)
    categorical, numeric = fitted.encode(coded, "f")
    plain_categorical, plain_numeric = fitted.encode(frame, "f")
    assert torch.equal(categorical, plain_categorical)
    assert torch.equal(numeric.nan_to_num(-1), plain_numeric.nan_to_num(-1))
    # and both equal the per-value polars expression that encodes streamed chunks' vocabularies
    expected = frame.select([e.expression().alias(e.name) for e in fitted.categorical]).to_torch()
    assert torch.equal(categorical, expected.to(torch.int64))
    assert LabelColumns(tasks, ["binary"] * len(tasks)).read(coded.frame, "f")[:, 0].sum() == 80


def test_vocabulary_orders_by_count_then_value_whatever_the_row_order() -> None:
    values = ["b", "a", "c", "a", "c", "b", "d", None, "d", "d"]
    for order in (values, values[::-1]):
        fitted = Encoders.fit(pl.DataFrame({"x": order, "n": range(10)}), ["x", "n"], [], min_frequency=1)
        assert fitted.categorical[0].values == ["d", "a", "b", "c"]  # 3, then ties of 2 by value
        assert fitted.categorical[1].values == list(range(10))


def test_max_vocab_keeps_the_most_frequent_values_ties_by_value() -> None:
    values = ["b", "a", "c", "a", "c", "b", "d", None, "d", "d", "e"]
    for order in (values, values[::-1]):
        frame = pl.DataFrame({"x": order})
        assert Encoders.fit(frame, ["x"], [], min_frequency=1, max_vocab=2).categorical[0].values == ["d", "a"]
        assert Encoders.fit(frame, ["x"], [], min_frequency=1, max_vocab=9).categorical[0].values == \
            ["d", "a", "b", "c", "e"]
        capped = Encoders.fit(frame, ["x"], [], min_frequency=1, max_vocab=2)
        codes, _ = capped.encode(frame, "f")
        assert (codes[:, 0] == 0).sum() == 6  # b, b, c, c, e and the null
    counts = CodedFrame(pl.DataFrame({"x": values})).column("x", "f").totals[:-1]
    assert capped_rows(counts, min_frequency=1, max_vocab=2) == (3, 5)  # b, c, e: 2 + 2 + 1 rows
    assert capped_rows(counts, min_frequency=2, max_vocab=2) == (2, 4)  # e is under --min-frequency anyway


def test_batches_without_a_generator_take_the_rows_in_order_and_split_them_across_ranks() -> None:
    data = EncodedData(torch.arange(10).view(10, 1), torch.zeros(10, 1), torch.zeros(10, 1),
                       rows=torch.tensor([1, 3, 5, 7, 9]))
    assert [(b.categorical[:, 0].tolist(), rows) for b, rows in data.batches(2)] == [
        ([1, 3], 2), ([5, 7], 2), ([9], 1)]
    assert [(b.categorical[:, 0].tolist(), rows) for b, rows in data.batches(2, None, rank=1, world_size=2)] == [
        ([5, 7], 4), ([], 1)]
    shuffled = [b.categorical[:, 0].tolist() for b, _ in data.batches(5, torch.Generator().manual_seed(0))]
    assert sorted(shuffled[0]) == [1, 3, 5, 7, 9]


def test_coding_leaves_the_callers_frame_alone_and_types_mean_what_polars_casts_say() -> None:
    frame = pl.DataFrame({"age": pl.Series([20, 30, 40, 25], dtype=pl.Int32),
                          "flag": [1, 0, 1, 1], "score": [-0.0, 0.0, 1.5, 0.0]})
    fitted = Encoders.fit(frame, ["age", "flag", "score"], ["age"], min_frequency=1)
    assert frame["age"].to_list() == [20, 30, 40, 25]  # an int32 column is not its own id buffer
    assert fitted.numeric[0].mean == pytest.approx(28.75)
    assert fitted.categorical[2].values == [0.0, 1.5]  # -0.0 and 0.0 are one value, as in polars
    later = pl.DataFrame({"age": pl.Series([25, 99], dtype=pl.Int32), "flag": [True, False], "score": [0.0, -0.0]})
    coded, _ = fitted.encode(CodedFrame(later), "t")
    plain, _ = fitted.encode(later, "t")  # a Boolean flag meets an integer vocabulary: cast, not read as text
    assert torch.equal(coded, plain) and coded[:, 1].tolist() == [1, 2] and coded[:, 2].tolist() == [1, 1]


@pytest.mark.parametrize("dtype", [pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64])
def test_integer_columns_of_every_width_code_and_encode_as_their_values_say(dtype: pl.DataType) -> None:
    low = 0 if dtype.is_unsigned_integer() else -3
    parts = [pl.DataFrame({"code": pl.Series([low + (i * 7 + j) % 11 if i % 9 else None for i in range(40)],
                                             dtype=dtype),
                           "far": pl.Series([100_000 + i % 5 for i in range(40)], dtype=pl.Int64)})
             for j in range(3)]
    frame = pl.concat(parts, rechunk=False)  # several chunks, as several Parquet row groups read
    rows = torch.arange(0, 120, 3)
    fitted = Encoders.fit(CodedFrame(frame), ["code", "far"], [], min_frequency=2, rows=rows)
    expected = Encoders.fit(frame[rows.numpy()], ["code", "far"], [], min_frequency=2)
    assert fitted.categorical == expected.categorical
    coded, _ = fitted.encode(CodedFrame(frame), "t")
    plain, _ = fitted.encode(frame, "t")
    assert torch.equal(coded, plain) and coded.min() == 0 and coded[:, 1].max() == 5


def test_unsigned_ids_past_int64_are_counted_and_excluded_when_all_distinct() -> None:
    frame = make_frame(150).with_columns(pl.Series("event_hash", [2**63 + 7 * i for i in range(150)],
                                                   dtype=pl.UInt64))
    roles = {c.name: c.role for c in infer_schema(CodedFrame(frame), "f", ["purchase", "click"]).columns}
    assert roles["event_hash"] == "excluded"


def test_a_missing_label_lists_every_column_of_a_dictionary_read_file(tmp_path) -> None:
    path = tmp_path / "valid.parquet"
    make_frame(50).drop("purchase").write_parquet(path)
    with pytest.raises(MbtrainError, match=r"'purchase' not found; columns are row_id, user, device, hour"):
        LabelColumns(["purchase", "click"], ["binary"] * 2).read(read_coded([path], plain=["purchase", "click"]), "v")


def test_several_parquet_files_are_read_as_one_with_their_dictionaries(tmp_path) -> None:
    """Files that store text as string and as large_string (pyarrow vs polars writers) code as one column."""
    frame = _mixed_frame(300)
    frame[:120].write_parquet(tmp_path / "a.parquet", row_group_size=50)
    pq.write_table(frame[120:].to_arrow().cast(pa.schema(
        [pa.field(f.name, pa.string() if f.type == pa.large_string() else f.type) for f in frame.to_arrow().schema])),
        tmp_path / "b.parquet")
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    assert pq.read_schema(files[1]).field("user").type == pa.string()
    tasks = ["purchase", "click"]
    coded = read_coded(files, plain=tasks)
    schema = infer_schema(coded, "f", tasks)
    assert schema == infer_schema(frame, "f", tasks)
    fitted = Encoders.fit(coded, schema.categorical, schema.numeric, min_frequency=2)
    plain = Encoders.fit(frame, schema.categorical, schema.numeric, min_frequency=2)
    assert fitted.categorical == plain.categorical
    assert torch.equal(fitted.encode(coded, "f")[0], fitted.encode(frame, "f")[0])
