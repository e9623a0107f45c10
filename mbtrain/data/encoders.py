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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from mbtrain.errors import MbtrainError

SKEWED = 2.0  # skewness above which a non-negative numeric column is log1p-transformed first

KINDS: dict[str, pl.DataType] = {"str": pl.String, "int": pl.Int64, "float": pl.Float64, "bool": pl.Boolean}


@dataclass
class CategoricalEncoder:
    name: str
    kind: str  # key of KINDS: the type the values are compared as
    values: list[Any]

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1

    @classmethod
    def fit(cls, column: pl.Series, min_frequency: int) -> CategoricalEncoder:
        kind = _kind(column.dtype)
        counts = column.cast(KINDS[kind]).drop_nulls().value_counts(sort=True, name="count")
        counts = counts.filter(pl.col("count") >= min_frequency)
        # frequency order, ties broken by value, so the vocabulary does not depend on row order
        counts = counts.sort(["count", column.name], descending=[True, False])
        return cls(column.name, kind, counts.get_column(column.name).to_list())

    def expression(self) -> pl.Expr:
        return (
            pl.col(self.name)
            .cast(KINDS[self.kind], strict=False)
            .replace_strict(self.values, list(range(1, self.cardinality)), default=0, return_dtype=pl.Int64)
        )


@dataclass
class NumericEncoder:
    name: str
    mean: float
    std: float
    log1p: bool

    @classmethod
    def fit(cls, column: pl.Series) -> NumericEncoder:
        values = column.cast(pl.Float64).fill_nan(None).drop_nulls()
        if values.len() == 0:
            return cls(column.name, 0.0, 1.0, False)
        skew = values.skew()
        log1p = bool(values.min() >= 0 and skew is not None and skew > SKEWED)
        if log1p:
            values = values.log1p()
        std = values.std(ddof=0) or 0.0
        return cls(column.name, float(values.mean()), float(std) if std > 1e-12 else 1.0, log1p)


@dataclass
class Encoders:
    categorical: list[CategoricalEncoder]
    numeric: list[NumericEncoder]

    @classmethod
    def fit(cls, frame: pl.DataFrame, categorical: list[str], numeric: list[str],
            min_frequency: int) -> Encoders:
        return cls(
            [CategoricalEncoder.fit(frame.get_column(name), min_frequency) for name in categorical],
            [NumericEncoder.fit(frame.get_column(name)) for name in numeric],
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
        categorical = _matrix(frame, [e.expression() for e in self.categorical], np.int64, rows)
        numeric = _matrix(
            frame,
            [pl.col(e.name).cast(pl.Float32).fill_null(math.nan) for e in self.numeric],
            np.float32,
            rows,
        )
        return categorical, numeric


def _kind(dtype: pl.DataType) -> str:
    if dtype == pl.Boolean:
        return "bool"
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    return "str"


def _matrix(frame: pl.DataFrame, expressions: list[pl.Expr], dtype: type, rows: int) -> torch.Tensor:
    if not expressions:
        return torch.empty(rows, 0, dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
    array = frame.select(expressions).to_numpy(order="c")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
