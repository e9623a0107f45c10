"""Encoders fitted on the training rows: categorical vocabularies and numeric statistics, JSON-serialisable.

Categorical values become indices 1..V by descending frequency; index 0 stands for everything the
vocabulary does not hold: nulls, values seen fewer than `min_frequency` times in training, and values
first seen at prediction time. Training on rare values as index 0 is what teaches that embedding row
to mean "unknown", so unseen categories at eval time land somewhere sensible.

Numeric columns stay raw in the encoded tensors (NaN for null): the model's NumericNormalizer applies
the statistics kept here, so the exported TorchScript file takes raw numbers and the transform lives
in one place.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from mbtrain.errors import MbtrainError, first_line

SKEWED = 2.0  # skewness above which a non-negative numeric column is log1p-transformed first

COLUMNS_AT_ONCE = 4  # encoded together: enough for polars to use every core, few enough to stay small
LOOKUP_SLACK = 4  # integer vocabularies use a lookup table when their value range is at most this × their size

KINDS: dict[str, pl.DataType] = {"str": pl.String, "int": pl.Int64, "float": pl.Float64}


@dataclass
class CategoricalEncoder:
    name: str
    kind: str  # key of KINDS: the type the values are compared as
    values: list[Any]

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1

    def expression(self) -> pl.Expr:
        """Value → index, 0 for null / unknown; the fastest polars form for the kind (measured on 2M rows:
        an Enum cast for text, a lookup table over the value range for integers, hashing otherwise)."""
        column = pl.col(self.name).cast(KINDS[self.kind], strict=False)
        if self.values and self.kind == "str":
            codes = column.cast(pl.Enum(self.values), strict=False).to_physical().cast(pl.Int64) + 1
            return codes.fill_null(0)
        if self.values and self.kind == "int":
            low, high = min(self.values), max(self.values)
            if high - low < LOOKUP_SLACK * len(self.values) + 1024:
                table = np.zeros(high - low + 2, dtype=np.int64)  # last slot: out of range
                table[np.asarray(self.values, dtype=np.int64) - low] = np.arange(1, self.cardinality)
                position = pl.when(column.is_between(low, high)).then(column - low).otherwise(high - low + 1)
                return pl.lit(pl.Series(table)).gather(position).fill_null(0).alias(self.name)
        return column.replace_strict(self.values, list(range(1, self.cardinality)), default=0, return_dtype=pl.Int64)


@dataclass
class NumericEncoder:
    name: str
    mean: float
    std: float
    log1p: bool

    @staticmethod
    def moments(name: str) -> list[pl.Expr]:
        """Aggregates the statistics come from (one row; the streaming engine can compute them too): count,
        min and skew of the values, mean and population std of both the values and their log1p."""
        values = pl.col(name).cast(pl.Float64).fill_nan(None)
        logged = values.log1p()
        return [
            values.count().alias(f"{name}\x00count"),
            values.min().alias(f"{name}\x00min"),
            values.skew().alias(f"{name}\x00skew"),
            values.mean().alias(f"{name}\x00mean"),
            values.std(ddof=0).alias(f"{name}\x00std"),
            logged.mean().alias(f"{name}\x00log_mean"),
            logged.std(ddof=0).alias(f"{name}\x00log_std"),
        ]

    @classmethod
    def from_moments(cls, name: str, row: dict[str, Any]) -> NumericEncoder:
        """log1p for non-negative columns skewed beyond SKEWED, then the matching mean and std."""
        if not row[f"{name}\x00count"]:
            return cls(name, 0.0, 1.0, False)
        skew = row[f"{name}\x00skew"]
        log1p = bool(row[f"{name}\x00min"] >= 0 and skew is not None and skew > SKEWED)
        prefix = "log_" if log1p else ""
        std = row[f"{name}\x00{prefix}std"] or 0.0
        return cls(name, float(row[f"{name}\x00{prefix}mean"]), float(std) if std > 1e-12 else 1.0, log1p)


@dataclass
class Encoders:
    categorical: list[CategoricalEncoder]
    numeric: list[NumericEncoder]

    @classmethod
    def fit(cls, frame: pl.DataFrame, categorical: list[str], numeric: list[str], min_frequency: int,
            rows: torch.Tensor | None = None) -> Encoders:
        """Fitted on `rows` of `frame` (all rows when None) without copying the training rows out: a value's
        training count is its count in the whole frame less its count in the (small) held-out rest, and the
        numeric statistics read the training rows of the numeric columns only."""
        schema, whole = frame.schema, frame.lazy()
        queries = [_counts(whole, schema, name) for name in categorical]
        numbers = whole
        if rows is not None:
            held = torch.ones(frame.height, dtype=torch.bool)
            held[rows] = False
            if categorical:
                rest = frame.select(categorical).filter(pl.Series(held.numpy())).lazy()
                queries += [_counts(rest, schema, name) for name in categorical]
            if numeric:
                numbers = frame.select(numeric).filter(pl.Series(~held.numpy())).lazy()
        queries.append(numbers.select([e for name in numeric for e in NumericEncoder.moments(name)]))
        # one query at a time: as fast as collect_all here (each group-by is parallel), with fewer hash tables alive
        *counts, moments = [query.collect() for query in queries]
        if rows is not None:
            counts = [_less(total, held_out, name)
                      for name, total, held_out in zip(categorical, counts, counts[len(categorical):], strict=False)]
        row = moments.row(0, named=True) if numeric else {}
        return cls(
            [CategoricalEncoder(name, _kind(schema[name]), _vocabulary(table, name, min_frequency))
             for name, table in zip(categorical, counts[: len(categorical)], strict=True)],
            [NumericEncoder.from_moments(name, row) for name in numeric],
        )

    @property
    def cardinalities(self) -> list[int]:
        return [encoder.cardinality for encoder in self.categorical]

    def to_dict(self) -> dict[str, Any]:
        return {"categorical": [asdict(e) for e in self.categorical], "numeric": [asdict(e) for e in self.numeric]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Encoders:
        return cls([CategoricalEncoder(**e) for e in raw["categorical"]],
                   [NumericEncoder(**e) for e in raw["numeric"]])

    def encode(self, frame: pl.DataFrame, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(categorical int64 [rows, C], numeric float32 [rows, N], NaN for null), built column-wise."""
        missing = [e.name for e in [*self.categorical, *self.numeric] if e.name not in frame.columns]
        if missing:
            raise MbtrainError(f"{source}: feature column {missing[0]!r} used by the model is missing"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for encoder in self.numeric:
            dtype = frame.schema[encoder.name]
            if not (dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null):
                raise MbtrainError(f"{source}: numeric column {encoder.name!r} has type {dtype}, expected numbers")
        rows = frame.height
        categorical = _matrix(frame, [e.expression() for e in self.categorical], torch.int64, rows, source)
        numeric = _matrix(
            frame,
            [pl.col(e.name).cast(pl.Float32).fill_null(math.nan) for e in self.numeric],
            torch.float32,
            rows,
            source,
        )
        return categorical, numeric


def _counts(frame: pl.LazyFrame, schema: pl.Schema, name: str) -> pl.LazyFrame:
    """(value, count) of one column's non-null values, compared as their kind."""
    return frame.select(pl.col(name).cast(KINDS[_kind(schema[name])])).drop_nulls().group_by(name).len("count")


def _less(total: pl.DataFrame, held_out: pl.DataFrame, name: str) -> pl.DataFrame:
    """Counts in the training rows: whole-frame counts less held-out counts."""
    joined = total.join(held_out, on=name, how="left", suffix="_held", nulls_equal=True)
    return joined.select(name, (pl.col("count") - pl.col("count_held").fill_null(0)).alias("count"))


def _vocabulary(counts: pl.DataFrame, name: str, min_frequency: int) -> list[Any]:
    """Values seen at least `min_frequency` times, most frequent first, ties broken by value so that the
    vocabulary does not depend on row order."""
    kept = counts.filter(pl.col("count") >= min_frequency).sort(["count", name], descending=[True, False])
    return kept.get_column(name).to_list()


def _value_counts(frame: pl.LazyFrame, schema: pl.Schema, name: str, min_frequency: int) -> pl.LazyFrame:
    """The vocabulary of one column as a query (for the streaming engine), ordered as `_vocabulary` orders it."""
    return (
        _counts(frame, schema, name)
        .filter(pl.col("count") >= min_frequency)
        .sort(["count", name], descending=[True, False])
    )


def _kind(dtype: pl.DataType) -> str:
    """How values are compared; booleans as text ("true"/"false"), which a CSV read elsewhere can match."""
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    return "str"


def _matrix(frame: pl.DataFrame, expressions: list[pl.Expr], dtype: torch.dtype, rows: int,
            source: str) -> torch.Tensor:
    """[rows, len(expressions)] column-major, as polars holds columns: no transposing copy of the table
    (0.37 s on 2M × 21), and only COLUMNS_AT_ONCE encoded columns exist twice at any time, which keeps the
    peak memory near frame + tensors. Gathering a batch of rows from it costs a few per cent more."""
    out = torch.empty(len(expressions), rows, dtype=dtype).T
    for start in range(0, len(expressions), COLUMNS_AT_ONCE):
        try:
            part = frame.select(expressions[start : start + COLUMNS_AT_ONCE])
        except pl.exceptions.PolarsError as exc:  # a column whose type cannot become the training type
            reason = first_line(exc)
            raise MbtrainError(f"{source}: cannot encode a column like the training data ({reason})") from None
        for offset, column in enumerate(part.iter_columns()):
            with warnings.catch_warnings():  # a read-only view of polars' buffer, only ever copied from
                warnings.simplefilter("ignore", UserWarning)
                out[:, start + offset] = torch.from_numpy(column.to_numpy())
    return out
