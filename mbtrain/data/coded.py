"""Columns as (distinct values, row ids), made once per column and shared by everything that reads a table.

Counting a column's ids (one bincount) gives role inference its distinct and null counts and the vocabulary
its value counts on any subset of rows; mapping the few distinct values through a vocabulary and gathering
by id encodes the column. For the two common kinds the ids cost almost nothing: text in a Parquet file is
usually stored dictionary-encoded, and pyarrow hands the file's dictionary over as it is (no hashing of two
million strings), and an integer column over a compact range is its own id (value − min). Anything else is
dictionary-encoded once by pyarrow.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mbtrain.errors import MbtrainError, first_line

KINDS: dict[str, pl.DataType] = {"str": pl.String, "int": pl.Int64, "float": pl.Float64}
INT64 = torch.iinfo(torch.int64)
RANGE_SLACK = 2  # an integer column is its own id while its value range is at most this × its rows (+ 65,536)


def kind_of(dtype: pl.DataType) -> str:
    """How values are compared; booleans as text ("true"/"false"), which a CSV read elsewhere can match."""
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    return "str"


def is_text(dtype: pa.DataType) -> bool:
    """Arrow text types, plain or dictionary-encoded."""
    if pa.types.is_dictionary(dtype):
        return is_text(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def codable(dtype: pl.DataType) -> bool:
    """Types a column can be coded from (others, such as dates and lists, only when cast by --categorical)."""
    return (dtype.is_integer() or dtype in (pl.String, pl.Boolean, pl.Null)
            or isinstance(dtype, (pl.Categorical, pl.Enum)))


@dataclass
class CodedColumn:
    values: pl.Series  # the candidate values, as the column holds them; a value's position is its id
    ids: torch.Tensor  # int32 [rows]: position in `values`, len(values) for a null

    def counts(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[len(values) + 1] occurrences of each value among `rows` (all rows when None), nulls last."""
        return torch.bincount(self.ids if rows is None else self.ids[rows], minlength=len(self.values) + 1)

    @cached_property
    def totals(self) -> torch.Tensor:
        """counts() over every row, kept: role inference and the vocabulary both start from it."""
        return self.counts()

    @property
    def distinct(self) -> int:
        """Distinct values with null counted as one, as polars' n_unique counts them."""
        return int((self.totals > 0).sum())


class CodedFrame:
    """A table in memory whose columns are coded on first use. Text columns that arrived dictionary-encoded
    (`dictionaries`) live only as their codes; every other column is in `frame`."""

    def __init__(self, frame: pl.DataFrame, dictionaries: Mapping[str, pa.ChunkedArray] | None = None,
                 order: list[str] | None = None) -> None:
        self.frame = frame
        self._dictionaries = dict(dictionaries or {})
        self.columns = order or frame.columns
        self.schema = pl.Schema({name: pl.String if name in self._dictionaries else frame.schema[name]
                                 for name in self.columns})
        first = next(iter(self._dictionaries.values()), None)
        self.height = len(first) if first is not None and not frame.width else frame.height
        self._coded: dict[str, CodedColumn] = {}

    def column(self, name: str, source: str) -> CodedColumn:
        """The column's codes, made once; a column whose values cannot be coded fails naming `source`."""
        if name not in self._coded:
            try:
                if name in self._dictionaries:
                    self._coded[name] = _from_dictionary(self._dictionaries[name])
                    del self._dictionaries[name]  # the codes hold everything the text column held
                else:
                    self._coded[name] = _from_series(self.frame.get_column(name))
            except (pl.exceptions.PolarsError, pa.ArrowException) as exc:
                raise MbtrainError(f"{source}: cannot read column {name!r} as categories ({first_line(exc)}); "
                                   "--exclude it, or store it as text") from None
        return self._coded[name]


def _from_series(column: pl.Series) -> CodedColumn:
    """Codes of the values as they are: comparing them as a kind is the vocabulary's business (a Boolean
    column met by an integer vocabulary must map as polars casts it, not as its text would)."""
    if column.dtype.is_integer():
        coded = _from_integers(column)
        if coded is not None:
            return coded
    if column.dtype.is_float():  # -0.0 and 0.0 are one value, as polars compares them
        column = pl.select(pl.when(column == 0).then(0.0).otherwise(column).cast(column.dtype)).to_series()
    arrow = column.to_arrow(compat_level=pl.CompatLevel.oldest())
    return _from_dictionary(pa.chunked_array([pc.dictionary_encode(arrow)]))


def _from_integers(column: pl.Series) -> CodedColumn | None:
    """value − min as the id, when the range is compact (None otherwise)."""
    low, high = column.min(), column.max()
    if low is None:  # every value null
        return CodedColumn(pl.Series(column.name, [], dtype=pl.Int64), torch.zeros(len(column), dtype=torch.int32))
    low, high = int(low), int(high)
    span = high - low + 1
    if span > RANGE_SLACK * len(column) + 65_536 or high >= INT64.max:  # values compare as Int64
        return None
    if column.null_count():
        column = column.fill_null(high + 1)  # id `span`: the null slot
    ids = torch.empty(len(column), dtype=torch.int32)
    for start, values in chunk_views(column):
        ids[start : start + len(values)] = values.to(torch.int64) - low
    return CodedColumn(pl.int_range(low, high + 1, dtype=pl.Int64, eager=True).alias(column.name), ids)


def _from_dictionary(column: pa.ChunkedArray) -> CodedColumn:
    """Ids from a dictionary-encoded column: its chunks' dictionaries unified, nulls given the last id."""
    column = column.unify_dictionaries()
    combined = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dictionary = combined.dictionary
    ids = pc.fill_null(combined.indices, len(dictionary)).cast(pa.int32())
    return CodedColumn(pl.Series(dictionary), tensor_view(ids.to_numpy()))


def chunk_views(column: pl.Series) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, a tensor over the chunk's buffer) for each chunk of `column` (one per Parquet row group as
    polars reads it): writing them into a tensor made for the result spares the copy that to_numpy makes to
    join the chunks. Integers or floats with nulls come as float arrays with NaN, one chunk at a time."""
    start = 0
    for chunk in column.get_chunks():
        yield start, tensor_view(chunk.to_numpy())
        start += len(chunk)


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """A tensor over a (possibly read-only) Arrow or polars buffer without a copy: only ever read or copied from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
