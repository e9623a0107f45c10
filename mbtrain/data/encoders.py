"""Encoders fitted on the training rows: categorical vocabularies and numeric statistics, JSON-serialisable.

Categorical values become indices 1..V by descending frequency; index 0 stands for everything the
vocabulary does not hold: nulls, values seen fewer than `min_frequency` times in training, and values
first seen at prediction time. Training on rare values as index 0 is what teaches that embedding row
to mean "unknown", so unseen categories at eval time land somewhere sensible.

A bag column (a list of text or integers per row) has one vocabulary over its elements, and each row's
list, cut to its last `max_bag` elements, is encoded as slots of element indices, -1 where the list ends: the
slots follow the scalar columns' indices in the same categorical tensor, bag after bag, every bag with as
many slots as the longest (cut) list of any bag in the rows encoded together (the model reads them as
[rows, bags, slots], whatever the number of slots).

Numeric columns stay raw in the encoded tensors (NaN for null): the model's NumericNormalizer applies
the statistics kept here, so the exported TorchScript file takes raw numbers and the transform lives
in one place.

A vector column (a list or array of numbers of one length d per row, such as a pretrained item embedding)
is d numeric inputs, `name[0]` … `name[d-1]`: they follow the scalar numeric columns in the numeric tensor,
vector after vector, each element standardised with its own training statistics (never log1p'd), a null list
or element NaN, hence 0 once normalised. `Encoders.numeric` holds a NumericEncoder per input, the elements
included, so that the normaliser and the model only ever see N numeric inputs; `Encoders.vectors` says which
columns the last of them come from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow.compute as pc
import torch

from mbtrain.data.coded import INT32, KINDS, CodedFrame, bag_kind, chunk_views, is_number_list, kind_of, tensor_view
from mbtrain.errors import MbtrainError, first_line

SKEWED = 2.0  # skewness above which a non-negative numeric column is log1p-transformed first

COLUMNS_AT_ONCE = 4  # encoded or measured together: enough for polars to use every core, few enough to stay small
LOOKUP_SLACK = 4  # integer vocabularies use a lookup table when their value range is at most this × their size
ENUM_VALUES = 1 << 17  # text vocabularies up to this size are looked up by an Enum cast (see _Lookup)
SORT_QUERIES = 1 << 20  # a binary search of at least this many values in at least as many sorts them first

FrameT = TypeVar("FrameT", pl.DataFrame, pl.LazyFrame)


class CategoricalEncoder:
    """A column's vocabulary: `vocabulary[i]` has index i + 1 (0: null, unknown or rare). Held as one polars Series
    of the kind's type (8 bytes an integer; a string's view and bytes), not as a Python object per value: a
    vocabulary may hold tens of millions of values. `values` (and `to_dict`, the saved form) lists them."""

    def __init__(self, name: str, kind: str, values: Sequence[Any] | pl.Series) -> None:
        self.name = name
        self.kind = kind  # key of KINDS: the type the values are compared as
        self.vocabulary = vocabulary_series(name, kind, values)
        self._lookup: _Lookup | None = None  # made on first use, then kept: building it costs O(values)

    @property
    def values(self) -> list[Any]:
        """The vocabulary as Python values, index order (one object each: code that need not, reads `vocabulary`)."""
        return self.vocabulary.to_list()

    @property
    def cardinality(self) -> int:
        return len(self.vocabulary) + 1

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and (self.name, self.kind) == (other.name, other.kind)
                and self.vocabulary.equals(other.vocabulary))

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value, as the dataclass it was

    def __repr__(self) -> str:
        return f"CategoricalEncoder(name={self.name!r}, kind={self.kind!r}, values=<{len(self.vocabulary):,}>)"

    def __getstate__(self) -> dict[str, Any]:  # pickled (torchrun's rank 0 hands the encoders over): the Series as
        return {**self.__dict__, "_lookup": None}  # Arrow buffers; the lookup is made again where it is used

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "values": self.values}

    def expression(self) -> pl.Expr:
        """Value → index, 0 for null / unknown. Each call costs O(rows), not O(values) (a streamed run encodes every
        chunk with it): the structure it reads is made once (`_Lookup`)."""
        column = pl.col(self.name).cast(KINDS[self.kind], strict=False)
        if self._lookup is None:
            self._lookup = _Lookup(self.vocabulary, self.kind)
        return self._lookup.expression(column).alias(self.name)

    def lookup(self, values: pl.Series, source: str) -> torch.Tensor:
        """int64 [len(values) + 1]: the index of each of a coded column's values, then 0 for its null id."""
        indices = _encoded(pl.DataFrame([values.alias(self.name)]), [self.expression()], source).to_series().to_numpy()
        return torch.cat([torch.from_numpy(indices.astype(np.int64)), torch.zeros(1, dtype=torch.int64)])


class _Lookup:
    """Value → index for one vocabulary, in the fastest form for its kind and size (per call of 131,072 rows with
    10M values, 2 cores: a polars Enum cast 7.7 s, polars' replace_strict 1.5 s, these 0.04–0.1 s):
    - integers over a compact range: a table over the range (as the encoded codes are gathered);
    - other integers: a binary search in the sorted values;
    - text: a polars Enum cast up to ENUM_VALUES values (fastest there), beyond, a binary search in the sorted
      64-bit hashes of the values, each hit checked against the value itself;
    - floats (only ever --categorical): polars' replace_strict."""

    def __init__(self, vocabulary: pl.Series, kind: str) -> None:
        self.vocabulary = vocabulary
        self.kind = kind
        size = len(vocabulary)
        self.enum = self.table = self.keys = self.order = self.sorted = None
        if not size or kind == "float":
            self.indices = pl.int_range(1, size + 1, eager=True)  # each value's index, in vocabulary order
            return
        if kind == "str":
            if size <= ENUM_VALUES:
                self.enum = pl.Enum(vocabulary)
                return
            keys, order = torch.sort(_hashes(vocabulary))
            if bool((keys[1:] == keys[:-1]).any()):  # two values share a hash (odds about 3 in 10^6 at 10M values):
                order = vocabulary.arg_sort()  # a binary search in the sorted text instead, slower
                self.sorted, self.indices = vocabulary.gather(order), order.cast(pl.Int64) + 1
                return
            self.keys, self.order = keys, order
            return
        low, high = vocabulary.min(), vocabulary.max()
        if high - low < LOOKUP_SLACK * size + 1024:
            index = torch.int32 if size < INT32.max else torch.int64
            table = torch.zeros(high - low + 2, dtype=index)  # last slot: out of range
            table[tensor_view(vocabulary.to_numpy()) - low] = torch.arange(1, size + 1, dtype=index)
            self.low, self.high, self.table = low, high, pl.Series(table.numpy())
            return
        self.keys, self.order = torch.sort(tensor_view(vocabulary.to_numpy()))

    def expression(self, column: pl.Expr) -> pl.Expr:
        if self.enum is not None:
            return (column.cast(self.enum, strict=False).to_physical().cast(pl.Int64) + 1).fill_null(0)
        if self.table is not None:
            low, high = self.low, self.high
            position = pl.when(column.is_between(low, high)).then(column - low).otherwise(high - low + 1)
            return pl.lit(self.table).gather(position).cast(pl.Int64).fill_null(0)
        if self.keys is not None:
            return column.map_batches(self._searched, return_dtype=pl.Int64, is_elementwise=True)
        if self.sorted is not None:  # text whose hashes collide; `indices` in the sorted order
            keys, indices = pl.lit(self.sorted), pl.lit(self.indices)
            position = keys.search_sorted(column).clip(0, len(self.sorted) - 1)
            return pl.when(keys.gather(position) == column).then(indices.gather(position)).otherwise(0).fill_null(0)
        return column.replace_strict(self.vocabulary, self.indices, default=0, return_dtype=pl.Int64)

    def _searched(self, values: pl.Series) -> pl.Series:
        """The indices of `values` (of the vocabulary's type) by binary search in `keys`, 0 where not found."""
        text = self.kind == "str"
        queries = _hashes(values) if text else tensor_view(values.fill_null(0).to_numpy())
        position = _searchsorted(self.keys, queries).clamp_(max=len(self.keys) - 1)
        candidate = self.order[position]
        if text:  # the hash matches: is it the value? (a null's hash may match a value's too)
            found = tensor_view((self.vocabulary.gather(candidate.numpy()) == values).fill_null(False).to_numpy())
        else:
            found = (self.keys[position] == queries) & tensor_view(values.is_not_null().to_numpy())
        return pl.Series(values.name, torch.where(found, candidate + 1, 0).numpy())


def _searchsorted(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """torch.searchsorted(keys, queries), the queries sorted first where both are many: the searches then walk
    the keys in order, which the caches like (10M queries in 10M keys: 1.4 s against 4.7 s)."""
    if min(len(keys), len(queries)) < SORT_QUERIES:
        return torch.searchsorted(keys, queries)
    ordered, order = torch.sort(queries)
    position = torch.empty(len(queries), dtype=torch.int64)
    position[order] = torch.searchsorted(keys, ordered)
    return position


def _hashes(values: pl.Series) -> torch.Tensor:
    """int64 [len(values)]: polars' 64-bit hash of each value, fixed seed (the same value, the same hash)."""
    return tensor_view(values.hash(seed=0).to_numpy().view(np.int64))


def vocabulary_series(name: str, kind: str, values: Sequence[Any] | pl.Series) -> pl.Series:
    """A vocabulary as one contiguous Series of the kind's type: from a fit's Series, or a saved list (a ValueError
    names the column where the list's values are not of the kind)."""
    dtype = KINDS[kind]
    if isinstance(values, pl.Series):
        return (values if values.dtype == dtype else values.cast(dtype)).alias(name).rechunk()
    try:
        return pl.Series(name, values, dtype=dtype, strict=True)
    except (TypeError, OverflowError, pl.exceptions.PolarsError) as exc:
        raise ValueError(f"the vocabulary of {name!r} is not of {dtype} values ({first_line(exc)})") from None


class BagEncoder:
    """A bag column's encoder: one vocabulary over its elements (`elements`, a CategoricalEncoder), each list's last
    `max_bag` elements encoded as slots."""

    def __init__(self, name: str, kind: str, values: Sequence[Any] | pl.Series, max_bag: int, width: int) -> None:
        self.elements = CategoricalEncoder(name, kind, values)  # how the elements compare, and their vocabulary
        self.max_bag = max_bag  # each list keeps its last this many elements
        self.width = width  # the training data's longest list, at most max_bag: what a row's slots take, for memory

    name = property(lambda self: self.elements.name)
    kind = property(lambda self: self.elements.kind)
    vocabulary = property(lambda self: self.elements.vocabulary)
    values = property(lambda self: self.elements.values)

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and self.elements == other.elements
                and (self.max_bag, self.width) == (other.max_bag, other.width))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"BagEncoder(name={self.name!r}, kind={self.kind!r}, values=<{len(self.vocabulary):,}>, "
                f"max_bag={self.max_bag}, width={self.width})")

    def to_dict(self) -> dict[str, Any]:
        return {**self.elements.to_dict(), "max_bag": self.max_bag, "width": self.width}

    def longest(self, column: pl.Series) -> int:
        """The longest of the column's lists, cut to max_bag (0 for a column of nulls or empty lists, or one that
        is not a list: encode says what is wrong with it)."""
        return longest_list(column, self.max_bag) if bag_kind(column.dtype) is not None else 0

    @property
    def cardinality(self) -> int:
        return self.elements.cardinality

    def encode(self, column: pl.Series, source: str, slots: int) -> torch.Tensor:
        """int64 [rows, slots] (slots at least the longest list cut to max_bag): each list's last `max_bag`
        elements as vocabulary indices (0 for unknown or null), then -1; a null or empty list is all -1."""
        if column.dtype == pl.Null:  # a column of nothing but nulls, as a CSV or an empty file gives it
            return torch.full((len(column), slots), -1, dtype=torch.int64)
        if bag_kind(column.dtype) is None:
            raise MbtrainError(f"{source}: column {self.name!r} is {column.dtype}, but the model was trained on it as "
                               "a list of text or integers (a bag)")
        lists = column.list.tail(self.max_bag).to_arrow()
        lengths = torch.from_numpy(pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64))
        elements = pl.DataFrame([pl.Series(self.name, lists.flatten())])
        codes = _encoded(elements, [self.elements.expression()], source)
        encoded = torch.full((len(column), slots), -1, dtype=torch.int64)
        starts = torch.cumsum(lengths, 0) - lengths
        row = torch.repeat_interleave(torch.arange(len(column)), lengths)
        slot = torch.arange(row.numel()) - torch.repeat_interleave(starts, lengths)
        encoded[row, slot] = torch.from_numpy(codes.to_series().to_numpy().astype(np.int64))
        return encoded

    @classmethod
    def fit(cls, column: pl.Series, max_bag: int, min_frequency: int, max_vocab: int | None,
            source: str = "training data") -> BagEncoder:
        """The vocabulary of the elements of each list's last `max_bag` (the ones the model sees), ordered as a
        categorical column's; the width the longest of those lists (at least 1)."""
        counted = element_counts(column, max_bag, source)
        values = _vocabulary(counted.get_column(column.name), count_tensor(counted.get_column("count")),
                             min_frequency, max_vocab)
        return cls(column.name, bag_kind(column.dtype), values, max_bag, max(1, longest_list(column, max_bag)))


def longest_list(column: pl.Series, max_bag: int) -> int:
    """The longest of a list column's lists, cut to `max_bag` (0 where all are null or empty)."""
    return min(max_bag, int(column.list.len().max() or 0))


def count_tensor(counts: pl.Series) -> torch.Tensor:
    """int64 [values] of a column of counts (a value_counts or group-by result)."""
    return torch.from_numpy(counts.cast(pl.Int64).to_numpy().copy())


def element_counts(column: pl.Series, max_bag: int, source: str = "training data") -> pl.DataFrame:
    """(element, "count") of a bag column's elements in each list's last `max_bag`, compared as their kind."""
    kind = bag_kind(column.dtype)
    try:
        elements = column.list.tail(max_bag).explode().drop_nulls().cast(KINDS[kind])
    except pl.exceptions.PolarsError as exc:
        raise MbtrainError(f"{source}: bag column {column.name!r} has elements that are not {KINDS[kind]} "
                           f"({first_line(exc)}); --exclude it, or store its elements as text") from None
    return elements.value_counts(name="count")


@dataclass
class NumericEncoder:
    name: str
    mean: float
    std: float
    log1p: bool

    @staticmethod
    def moments(name: str) -> list[pl.Expr]:
        """Aggregates the statistics come from (one row; the streaming engine can compute them too): count, min,
        mean and population std of the values."""
        values = _float_values(name)
        return [values.count().alias(f"{name}\x00count"), values.min().alias(f"{name}\x00min"),
                values.mean().alias(f"{name}\x00mean"), values.std(ddof=0).alias(f"{name}\x00std")]

    @staticmethod
    def skewness(name: str) -> list[pl.Expr]:
        """The skew of the values, which decides log1p for a column that may_log1p."""
        return [_float_values(name).skew().alias(f"{name}\x00skew")]

    @staticmethod
    def log_moments(name: str) -> list[pl.Expr]:
        """Mean and population std of log1p of the values, for a column that wants_log1p."""
        logged = _float_values(name).log1p()
        return [logged.mean().alias(f"{name}\x00log_mean"), logged.std(ddof=0).alias(f"{name}\x00log_std")]

    @staticmethod
    def may_log1p(name: str, row: dict[str, Any]) -> bool:
        """Non-negative values: log1p if skewed."""
        return bool(row[f"{name}\x00count"] and row[f"{name}\x00min"] >= 0)

    @classmethod
    def wants_log1p(cls, name: str, row: dict[str, Any]) -> bool:
        """Non-negative and skewed beyond SKEWED: log1p first."""
        skew = row.get(f"{name}\x00skew")
        return cls.may_log1p(name, row) and skew is not None and skew > SKEWED

    @classmethod
    def from_moments(cls, name: str, row: dict[str, Any]) -> NumericEncoder:
        """log1p where wants_log1p says so, then the matching mean and std."""
        if not row[f"{name}\x00count"]:
            return cls(name, 0.0, 1.0, False)
        log1p = cls.wants_log1p(name, row)
        prefix = "log_" if log1p else ""
        std = row[f"{name}\x00{prefix}std"] or 0.0
        return cls(name, float(row[f"{name}\x00{prefix}mean"]), float(std) if std > 1e-12 else 1.0, log1p)


@dataclass
class VectorEncoder:
    """A vector column: `length` numbers per row, the numeric inputs `elements`. Their statistics are
    NumericEncoders like a scalar column's (in Encoders.numeric), fitted from moments without a skew, so never
    log1p'd: an embedding's coordinates are not counts."""

    name: str
    length: int

    @property
    def elements(self) -> list[str]:
        return [f"{self.name}[{i}]" for i in range(self.length)]

    def unnested(self, frame: FrameT, dtype: pl.DataType) -> FrameT:
        """The column of `frame` (eager or lazy) as one column per element, named `elements`, null where the list
        is: a scalar numeric column each, whose moments cost what a scalar column's do (a per-element list.get
        costs 3-5× more). An array (`dtype`) is read as one, not cast to a list: polars' streaming engine fails
        that cast where a row is null."""
        column = pl.col(self.name)
        lists = column.arr if isinstance(dtype, pl.Array) else column.list
        return frame.select(lists.to_struct(fields=self.elements)).unnest(self.name)

    def moments(self) -> list[pl.Expr]:
        """NumericEncoder.moments of each element, over `unnested`'s columns."""
        return [e for element in self.elements for e in NumericEncoder.moments(element)]

    def fitted(self, row: dict[str, Any]) -> list[NumericEncoder]:
        """The elements' encoders from `moments`' row."""
        return [NumericEncoder.from_moments(element, row) for element in self.elements]

    def encode(self, column: pl.Series, source: str, out: torch.Tensor) -> None:
        """Writes the column into out (float32 [rows, length]), NaN for a null list or element; a list of any other
        length is an error naming the column."""
        if column.dtype == pl.Null:  # a column of nothing but nulls
            out.fill_(float("nan"))
            return
        if not is_number_list(column.dtype):
            raise MbtrainError(f"{source}: column {self.name!r} is {column.dtype}, but the model was trained on it as "
                               f"a vector (a list of {self.length} numbers per row)")
        lengths = column.arr.len() if isinstance(column.dtype, pl.Array) else column.list.len()
        wrong = lengths.filter(lengths != self.length)
        if wrong.len():
            raise MbtrainError(f"{source}: vector column {self.name!r} has a list of {wrong[0]} numbers, but the "
                               f"model was trained on lists of {self.length} (every row's list needs that length, "
                               "or is null)")
        present = column.is_not_null()
        values = column.filter(present).explode().cast(pl.Float32)  # NaN for a null element, as to_numpy gives it
        values = tensor_view(values.to_numpy()).view(-1, self.length)
        if len(values) == len(column):
            out.copy_(values)
        else:
            out.fill_(float("nan"))
            out[tensor_view(present.to_numpy())] = values


@dataclass
class Encoders:
    """Every feature's encoder. `numeric` holds one per numeric input, in the numeric tensor's order: the scalar
    columns', then each vector's elements' (module docstring)."""

    categorical: list[CategoricalEncoder]
    numeric: list[NumericEncoder]
    bags: list[BagEncoder] = field(default_factory=list)
    vectors: list[VectorEncoder] = field(default_factory=list)

    def __post_init__(self) -> None:
        elements = [element for vector in self.vectors for element in vector.elements]
        if [e.name for e in self.numeric[len(self.numeric) - len(elements) :]] != elements:
            raise ValueError("the numeric encoders do not end with the vector columns' elements")

    @classmethod
    def fit(cls, frame: pl.DataFrame | CodedFrame, categorical: list[str], numeric: list[str], min_frequency: int,
            rows: torch.Tensor | None = None, source: str = "training data", max_vocab: int | None = None,
            bags: list[str] = (), max_bag: int = 50, vectors: Mapping[str, int] | None = None) -> Encoders:
        """Fitted on `rows` of `frame` (all rows when None) without copying the training rows out: a value's
        training count is its count in the whole frame (which role inference has already taken) less its count
        in the held-out rest; the numeric statistics read the training rows of the numeric columns only. With
        `max_vocab`, each vocabulary keeps its most frequent values up to that many. Bag columns (`bags`) see
        each list's last `max_bag` elements; `vectors` maps each vector column to its length (Schema.vectors)."""
        coded = frame if isinstance(frame, CodedFrame) else CodedFrame(frame)
        held = None
        if rows is not None:
            mask = torch.ones(coded.height, dtype=torch.bool)
            mask[rows] = False
            held = mask.nonzero().squeeze(1)
        vocabularies = []
        for name in categorical:
            column = coded.column(name, source)
            kind = kind_of(coded.schema[name])
            try:  # the distinct values, compared as their kind (booleans as "true" / "false")
                values = column.values.cast(KINDS[kind])
            except pl.exceptions.PolarsError as exc:
                raise MbtrainError(f"{source}: column {name!r} has values that are not {KINDS[kind]} "
                                   f"({first_line(exc)}); --exclude it, or store it as text") from None
            counts = column.totals if held is None else column.totals - column.counts(held)
            vocabularies.append(CategoricalEncoder(name, kind, _vocabulary(values, counts[:-1], min_frequency,
                                                                           max_vocab)))
        training = None if held is None else pl.lit(pl.Series(~mask.numpy()))
        row: dict[str, Any] = {}
        for start in range(0, len(numeric), COLUMNS_AT_ONCE):  # a few columns' training rows at a time
            names = numeric[start : start + COLUMNS_AT_ONCE]
            values = coded.frame.select(names) if training is None else coded.frame.select(names).filter(training)
            row |= values.select([e for name in names for e in NumericEncoder.moments(name)]).row(0, named=True)
            # then, only where used (each costs time: docs/benchmarks.md): skew where log1p may apply, log1p
            # moments where it does; each step narrows the names of the last
            for later, wanted in ((NumericEncoder.skewness, NumericEncoder.may_log1p),
                                  (NumericEncoder.log_moments, NumericEncoder.wants_log1p)):
                names = [name for name in names if wanted(name, row)]
                if names:
                    row |= values.select([e for name in names for e in later(name)]).row(0, named=True)
        vector_encoders = [VectorEncoder(name, length) for name, length in (vectors or {}).items()]
        for vector in vector_encoders:  # one column's training rows at a time, as the scalar columns'
            values = coded.frame.select(vector.name)
            values = vector.unnested(values if training is None else values.filter(training),
                                     coded.schema[vector.name])
            row |= values.select(vector.moments()).row(0, named=True)
        bag_encoders = []
        for name in bags:
            column = coded.frame.get_column(name)
            bag_encoders.append(BagEncoder.fit(column if rows is None else column.gather(rows.numpy()), max_bag,
                                               min_frequency, max_vocab, source))
        return cls(vocabularies, [*(NumericEncoder.from_moments(name, row) for name in numeric),
                                  *(e for vector in vector_encoders for e in vector.fitted(row))],
                   bag_encoders, vector_encoders)

    @property
    def scalar_numeric(self) -> list[NumericEncoder]:
        """The numeric columns' encoders, without the vectors' elements."""
        return self.numeric[: len(self.numeric) - sum(vector.length for vector in self.vectors)]

    @property
    def columns(self) -> list[str]:
        """The feature columns the encoding reads (a categorical+numeric column twice)."""
        return [e.name for e in [*self.categorical, *self.scalar_numeric, *self.bags, *self.vectors]]

    @property
    def cardinalities(self) -> list[int]:
        """Rows of each feature's embedding: the categorical columns', then the bags' (table_slices without the
        names: what models/base.py's Inputs takes)."""
        return [rows for _, rows in table_slices(self)]

    @property
    def slots(self) -> int:
        """The encoded categorical tensor's width on the training data: one per categorical column, the widest
        bag's per bag (memory sizing; other rows encode to as many slots as their own longest list needs)."""
        return len(self.categorical) + len(self.bags) * max((bag.width for bag in self.bags), default=0)

    def widened(self, categorical: torch.Tensor, width: int) -> torch.Tensor:
        """Encoded categorical codes [rows, C + bags·L] with each bag's slots padded with -1 to make `width`."""
        if categorical.shape[1] == width:
            return categorical
        columns, bags, rows = len(self.categorical), len(self.bags), categorical.shape[0]
        slots = categorical.new_full((rows, bags, (width - columns) // bags), -1)
        have = (categorical.shape[1] - columns) // bags
        slots[:, :, :have] = categorical[:, columns:].reshape(rows, bags, have)
        return torch.cat([categorical[:, :columns], slots.flatten(1)], dim=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: each vocabulary as a list of its values (the exported spec's contract)."""
        return {"categorical": [e.to_dict() for e in self.categorical], "numeric": [asdict(e) for e in self.numeric],
                "bags": [e.to_dict() for e in self.bags], "vectors": [asdict(e) for e in self.vectors]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Encoders:
        """to_dict's inverse; a run saved before bags or vectors existed has no such key."""
        return cls([CategoricalEncoder(**e) for e in raw["categorical"]],
                   [NumericEncoder(**e) for e in raw["numeric"]], [BagEncoder(**e) for e in raw.get("bags", [])],
                   [VectorEncoder(**e) for e in raw.get("vectors", [])])

    def encode(self, frame: pl.DataFrame | CodedFrame, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(categorical int64 [rows, C + the bags' slots], numeric float32 [rows, N: the scalar columns, then the
        vectors' elements], NaN for null), built column-wise. A CodedFrame (the in-memory path, whose codes role
        inference and fitting have made already) gathers each column's codes through its vocabulary's lookup table;
        a plain frame (a streamed chunk, data to score) goes through polars expressions, which cost less than coding
        it first (docs/benchmarks.md). The bags' slots (module docstring) follow the categorical columns."""
        categorical, numeric = self._encode_columns(frame, source)
        if not self.bags:
            return categorical, numeric
        table = frame.frame if isinstance(frame, CodedFrame) else frame
        columns = [table.get_column(e.name) for e in self.bags]
        slots = max(1, *(e.longest(column) for e, column in zip(self.bags, columns, strict=True)))
        return torch.cat([categorical, *(e.encode(column, source, slots)
                                         for e, column in zip(self.bags, columns, strict=True))], 1), numeric

    def _encode_columns(self, frame: pl.DataFrame | CodedFrame, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [name for name in self.columns if name not in frame.columns]
        if missing:
            raise MbtrainError(f"{source}: feature column {missing[0]!r} used by the model is missing"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for encoder in self.scalar_numeric:
            dtype = frame.schema[encoder.name]
            if not (dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null):
                raise MbtrainError(f"{source}: numeric column {encoder.name!r} has type {dtype}, expected numbers")
        for encoder in self.categorical:
            dtype = frame.schema[encoder.name]
            if dtype.is_nested():
                raise MbtrainError(f"{source}: column {encoder.name!r} is {dtype}, but the model was trained on it "
                                   "as one value per row")
        # column-major, see _numeric_matrix; zeros, not empty: the parallel fill takes the page faults of fresh
        # memory on every core, where the single-threaded column writes below would take them on one
        categorical = torch.zeros(len(self.categorical), frame.height, dtype=torch.int64).T
        if isinstance(frame, CodedFrame):
            for j, encoder in enumerate(self.categorical):
                column = frame.column(encoder.name, source)
                column.gather(encoder.lookup(column.values, source), out=categorical[:, j])
            return categorical, self._numeric(frame.frame, source)
        for start in range(0, len(self.categorical), COLUMNS_AT_ONCE):
            part = _encoded(frame, [e.expression() for e in self.categorical[start : start + COLUMNS_AT_ONCE]], source)
            for offset, column in enumerate(part.iter_columns()):
                categorical[:, start + offset] = tensor_view(column.to_numpy())
        return categorical, self._numeric(frame, source)

    def _numeric(self, frame: pl.DataFrame, source: str) -> torch.Tensor:
        """float32 [rows, N], column-major (_numeric_matrix): the scalar columns, then each vector's elements."""
        scalars = [e.name for e in self.scalar_numeric]
        out = _numeric_matrix(frame, scalars, len(self.numeric))
        start = len(scalars)
        for vector in self.vectors:
            vector.encode(frame.get_column(vector.name), source, out[:, start : start + vector.length])
            start += vector.length
        return out


def table_slices(encoders: Encoders) -> list[tuple[str, int]]:
    """(column name, rows of the fused embedding table it owns) per categorical column, then per bag: the table's
    order (models/embedding.py's FusedEmbedding lays the slices out so, from Encoders.cardinalities). A slice's rows
    are its vocabulary's values plus row 0, unknown."""
    return [(encoder.name, encoder.cardinality) for encoder in [*encoders.categorical, *encoders.bags]]


def _float_values(name: str) -> pl.Expr:
    """A numeric column as the statistics see it: Float64, NaN counted as null."""
    return pl.col(name).cast(pl.Float64).fill_nan(None)


def _encoded(frame: pl.DataFrame, expressions: list[pl.Expr], source: str) -> pl.DataFrame:
    """The encoding expressions' result; a column whose type cannot become the training type fails here."""
    try:
        return frame.select(expressions)
    except pl.exceptions.PolarsError as exc:
        raise MbtrainError(f"{source}: cannot encode a column like the training data ({first_line(exc)})") from None


def value_counts_query(frame: pl.LazyFrame, schema: pl.Schema, name: str, min_frequency: int = 1) -> pl.LazyFrame:
    """(value, "count") of one column's non-null values seen at least `min_frequency` times, compared as their kind,
    in no order: a query for the streaming engine, whose result `vocabulary_of` orders."""
    counted = frame.select(pl.col(name).cast(KINDS[kind_of(schema[name])])).drop_nulls().group_by(name).len("count")
    return counted.filter(pl.col("count") >= max(min_frequency, 1))


def vocabulary_of(counted: pl.DataFrame, name: str, min_frequency: int, max_vocab: int | None = None) -> pl.Series:
    """The vocabulary from a value_counts_query's result, ordered as the in-memory fit orders it (`_vocabulary`)."""
    return _vocabulary(counted.get_column(name), count_tensor(counted.get_column("count")), min_frequency, max_vocab)


def _vocabulary(values: pl.Series, counts: torch.Tensor, min_frequency: int, max_vocab: int | None = None
                ) -> pl.Series:
    """Values seen at least `min_frequency` times (and at least once), most frequent first, ties broken by
    value so that the vocabulary does not depend on row order: a sort by value, then a stable sort by count
    (faster than polars' two-key sort: 2.1 s against 7.6 s for 9M integers, 7.6 s against 19 s for 9M strings);
    the first `max_vocab` of them where that is set."""
    values = values.rechunk()  # a streamed group-by's result comes in many chunks: sorting them costs 1.5× more
    kept = (counts >= max(min_frequency, 1)).nonzero().squeeze(1)
    candidates = values if len(kept) == len(values) else values.gather(kept.numpy())
    order = kept[tensor_view(candidates.arg_sort().cast(pl.Int64).to_numpy())]
    order = order[torch.sort(counts[order], descending=True, stable=True).indices][:max_vocab]
    return values.gather(order.numpy())


def vocabulary_size(counts: torch.Tensor, min_frequency: int, max_vocab: int | None) -> int:
    """How many values a vocabulary fitted on these value counts keeps (as `_vocabulary` keeps them)."""
    kept = int((counts >= max(min_frequency, 1)).sum())
    return kept if max_vocab is None else min(kept, max_vocab)


def capped_rows(counts: torch.Tensor, min_frequency: int, max_vocab: int) -> tuple[int, int]:
    """(values that --max-vocab drops from a vocabulary, the rows holding them, which map to unknown) from a
    column's value counts (no null count)."""
    kept = counts[counts >= max(min_frequency, 1)]
    dropped = torch.sort(kept, descending=True).values[max_vocab:]
    return int(dropped.numel()), int(dropped.sum())


def _numeric_matrix(frame: pl.DataFrame, names: list[str], width: int) -> torch.Tensor:
    """float32 [rows, width], the columns `names` first (the rest left for the caller), NaN for null,
    column-major as polars holds columns: no transposing copy of the table, and one converted column alive at a
    time besides the result; gathering a batch of rows from it costs a little more (docs/benchmarks.md has both
    figures)."""
    out = torch.empty(width, frame.height, dtype=torch.float32).T
    for j, name in enumerate(names):
        column = frame.get_column(name)
        if not (column.dtype.is_float() or column.dtype.is_integer()):
            column = column.cast(pl.Float32)  # booleans, an all-null column
        for start, values in chunk_views(column):  # floats and NaN for null; float32 as the copy is made
            out[start : start + len(values), j] = values
    return out
