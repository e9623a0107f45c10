"""Columns as (distinct values, row ids), made once per column and shared by everything that reads a table.

Counting a column's ids (bincounts) gives role inference its distinct and null counts and the vocabulary
its value counts on any subset of rows; mapping the few distinct values through a vocabulary and gathering
by id encodes the column. For the two common kinds the ids are never written out: text in a Parquet file is
usually stored dictionary-encoded, and pyarrow hands each row group's dictionary and positions over as they
are (no hashing of two million strings), and an integer column over a compact range is its own id
(value − min). Both stay in the buffers they were read into, chunk by chunk (`Codes`). Other integers (ids
spread over 64 bits) are ranked by one sort, their ids written once as int32; anything else is
dictionary-encoded once by pyarrow. Nothing here costs a Python object per value: a column may hold tens of
millions of distinct values.
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
INT32, INT64 = torch.iinfo(torch.int32), torch.iinfo(torch.int64)
INDEX_TYPES = (torch.int32, torch.int64)
RANGE_SLACK = 2  # an integer column is its own id while its value range is at most this × its rows (+ 65,536)
AS_IS_LOW = 65_536  # integers from 0 up to this minimum are counted and looked up as they are (see Codes.as_is)


def kind_of(dtype: pl.DataType) -> str:
    """How values are compared; booleans as text ("true"/"false"), which a CSV read elsewhere can match."""
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    return "str"


def bag_kind(dtype: pl.DataType) -> str | None:
    """How a bag's elements compare ("str" or "int") for a list of text or integers; None for anything else."""
    if not isinstance(dtype, pl.List):
        return None
    inner = dtype.inner
    if inner == pl.String or isinstance(inner, (pl.Categorical, pl.Enum)):
        return "str"
    return "int" if inner.is_integer() else None


def is_number_list(dtype: pl.DataType) -> bool:
    """A list or fixed-size array of numbers: what a vector column is read from (one of floats by inference; one of
    integers only by --numeric, as such a list is otherwise a bag)."""
    return isinstance(dtype, (pl.List, pl.Array)) and dtype.inner.is_numeric()


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
class Codes:
    """One chunk of a column (a Parquet row group as read) in the form it arrived: its codes are the integer
    values themselves, or positions in the chunk's own dictionary. Keeping them so, instead of writing an id
    per row, spares 8 MB per column per 2M rows and the pass that would write them (for text, and for int32 /
    int64 columns without nulls; other integer columns keep an int32 copy of their values)."""

    start: int  # the chunk's first row
    codes: torch.Tensor  # [rows of the chunk]: integer values (nulls filled) or dictionary positions
    low: int  # integer values: id = value − low; dictionary positions: 0
    remap: torch.Tensor | None  # dictionary positions: int64 [positions + 1] position → id, the null slot last

    @property
    def as_is(self) -> bool:
        """Integer values counted and looked up as they are, with `low` unused slots before the first value:
        no subtracted copy of the chunk."""
        return self.remap is None and 0 <= self.low <= AS_IS_LOW


@dataclass
class CodedColumn:
    values: pl.Series  # the candidate values, as the column holds them; a value's position is its id
    chunks: list[Codes]  # in row order; len(values) is the id of a null

    def counts(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[len(values) + 1] occurrences of each value among `rows` (sorted; all rows when None), nulls last."""
        counts = torch.zeros(len(self.values) + 1, dtype=torch.int64)
        bounds = None  # each chunk's share of `rows`, found at once
        if rows is not None:
            ends = torch.tensor([chunk.start + len(chunk.codes) for chunk in self.chunks])
            bounds = [0, *torch.searchsorted(rows, ends).tolist()]
        for i, chunk in enumerate(self.chunks):
            codes = chunk.codes if bounds is None else chunk.codes[rows[bounds[i] : bounds[i + 1]] - chunk.start]
            if chunk.remap is not None:  # count positions, then add each position's count to its id
                counts.index_add_(0, chunk.remap, torch.bincount(codes, minlength=len(chunk.remap)))
            elif chunk.as_is:
                counts += torch.bincount(codes, minlength=chunk.low + len(counts))[chunk.low :]
            else:
                counts += torch.bincount(codes.to(torch.int64) - chunk.low, minlength=len(counts))
        return counts

    @cached_property
    def totals(self) -> torch.Tensor:
        """counts() over every row, kept: role inference and the vocabulary both start from it."""
        return self.counts()

    @property
    def distinct(self) -> int:
        """Distinct values with null counted as one, as polars' n_unique counts them."""
        return int((self.totals > 0).sum())

    def gather(self, table: torch.Tensor, out: torch.Tensor) -> None:
        """out[row] = table[id of row], for every row: `table` has an entry per value, then one for null."""
        padded = None  # for integer chunks looked up as they are (they share one `low`)
        for chunk in self.chunks:
            rows = out[chunk.start : chunk.start + len(chunk.codes)]
            if chunk.remap is not None:  # map the chunk's few dictionary positions, not its rows
                torch.index_select(table[chunk.remap], 0, chunk.codes, out=rows)
            elif chunk.as_is:
                if padded is None:
                    padded = torch.cat([table.new_zeros(chunk.low), table])
                torch.index_select(padded, 0, chunk.codes, out=rows)
            else:
                torch.index_select(table, 0, chunk.codes.to(torch.int64) - chunk.low, out=rows)


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
    return _from_dictionary(pa.chunked_array([pc.dictionary_encode(arrow)]), unique=True)


def _from_integers(column: pl.Series) -> CodedColumn | None:
    """value − min as the id, when the range is compact; else the value's rank among the distinct values (None
    past Int64, as values compare as Int64)."""
    low, high = column.min(), column.max()
    if low is None:  # every value null
        return CodedColumn(pl.Series(column.name, [], dtype=pl.Int64),
                           [Codes(0, torch.zeros(len(column), dtype=torch.int32), 0, None)])
    low, high = int(low), int(high)
    if high >= INT64.max:
        return None
    span = high - low + 1
    if span > RANGE_SLACK * len(column) + 65_536:
        return _from_sparse_integers(column, low)
    filled = bool(column.null_count())
    if filled:
        column = column.fill_null(high + 1)  # id `span`: the null slot
    # views of the column's own buffers where torch can count and index by them (int32 / int64 without nulls);
    # otherwise a copy (other widths, or the filled copy) as int32 where the values fit
    width = torch.int32 if INT32.min <= low and high < INT32.max else torch.int64
    chunks = [Codes(start, values if values.dtype in INDEX_TYPES and not filled else values.to(width), low, None)
              for start, values in chunk_views(column)]
    return CodedColumn(pl.int_range(low, high + 1, dtype=pl.Int64, eager=True).alias(column.name), chunks)


def _from_sparse_integers(column: pl.Series, low: int) -> CodedColumn:
    """The distinct values sorted, a value's id its rank, written once as int32 (int64 past 2^31 values): a sort
    costs less than hashing (12M rows of 10M random 64-bit ids: 1.2 s and 0.45 GiB at the peak against 3.9 s
    and 1.0 GiB for pyarrow's dictionary_encode)."""
    nulls = column.is_null()
    values = tensor_view(column.fill_null(low).cast(pl.Int64).to_numpy())
    distinct, ids = torch.unique(values, sorted=True, return_inverse=True)
    ids = ids.to(torch.int32 if len(distinct) < INT32.max else torch.int64)
    if column.null_count():
        ids[tensor_view(nulls.to_numpy())] = len(distinct)  # the null slot
    return CodedColumn(pl.Series(column.name, distinct.numpy()).cast(column.dtype), [Codes(0, ids, 0, None)])


def _from_dictionary(column: pa.ChunkedArray, unique: bool = False) -> CodedColumn:
    """Ids from a dictionary-encoded column: the distinct values of its chunks' dictionaries (in first-seen order),
    each chunk's positions mapped onto them through a small table (no rewriting of its rows), nulls given the last
    id. The dictionaries are hashed together once (a lookup per chunk would hash every distinct value again for
    each chunk: 28 s for 12 chunks of a 10M-value column); `unique`: the column is one chunk whose dictionary holds
    each value once, without nulls (dictionary_encode's), its positions already the ids."""
    chunks = [chunk for chunk in column.chunks if len(chunk)]
    dictionaries = [chunk.dictionary for chunk in chunks]
    if unique and len(chunks) == 1 and not dictionaries[0].null_count:
        values, ids = dictionaries[0], pa.array(np.arange(len(dictionaries[0]), dtype=np.int64))
    else:
        merged = pc.dictionary_encode(pa.concat_arrays(dictionaries) if chunks
                                      else pa.array([], column.type.value_type))  # nulls stay out of its dictionary
        values, ids = merged.dictionary, merged.indices
    coded, start, offset = [], 0, 0
    for chunk, dictionary in zip(chunks, dictionaries, strict=True):
        remap = pc.fill_null(ids.slice(offset, len(dictionary)), len(values))
        remap = torch.cat([tensor_view(remap.to_numpy()).to(torch.int64), torch.tensor([len(values)])])
        positions = chunk.indices
        if positions.null_count:
            positions = pc.fill_null(positions, len(chunk.dictionary))
        positions = tensor_view(positions.to_numpy())
        coded.append(Codes(start, positions if positions.dtype in INDEX_TYPES else positions.to(torch.int32), 0, remap))
        start, offset = start + len(chunk), offset + len(dictionary)
    coded_column = CodedColumn(pl.Series(values), coded)
    pa.default_memory_pool().release_unused()  # the hash table's pages, which pyarrow's pool would keep (0.8 GiB
    # for 10M values), dead weight to every later step that allocates through torch or polars
    return coded_column


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
