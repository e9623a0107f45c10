"""Decide each column's role (label, categorical, numeric, bag, vector, excluded) and validate the label columns.

Inference, overridable with --categorical / --numeric / --exclude:
- text, categorical and boolean columns are categorical;
- floats are numeric;
- integers are categorical when the name looks like an identifier (`user_id`, `item_code`, `id`) or
  they take at most SMALL_INT_CARDINALITY values (hour, weekday, label-encoded codes); up to
  DUAL_INT_CARDINALITY values (age, counts, amounts) they are both: the value as a number keeps the
  order, its embedding learns what a linear read-out cannot (measured on Adult: docs/benchmarks.md);
  beyond that they are numeric;
- lists of text or integers (a user's recent item ids, an item's tags) are categorical bags: one
  vocabulary over their elements, each row's list pooled into one embedding;
- lists or arrays of floats of one length d (a pretrained item embedding) are vectors: d numeric inputs,
  each element standardised (data/encoders.py); --numeric makes a list of integers one too. Lists of
  different lengths (null rows aside) are an error: such a column needs --exclude;
- a column whose every value is distinct (a row id), an all-null column, and types we cannot encode
  (dates, structs, lists of anything else) are excluded, with the reason shown by `mbtrain inspect`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch

from mbtrain.data.coded import CodedFrame, bag_kind, codable, is_number_list
from mbtrain.errors import MbtrainError
from mbtrain.metrics import NULL_GROUP

SMALL_INT_CARDINALITY = 32
DUAL_INT_CARDINALITY = 1000
ID_NAME = re.compile(r"(?i:(^|[_\-\s])(id|code|key|idx)$)|[a-z0-9]I[dD]$")  # user_id, item-code, userId


@dataclass
class Column:
    name: str
    role: str  # "label", "categorical", "numeric", "categorical+numeric", "bag", "vector" or "excluded"
    dtype: str
    reason: str
    distinct: int | None  # not counted for floats; a bag's: of its elements
    null_share: float
    lengths: tuple[float, int] | None = None  # a bag's mean and longest list (a null list counts as empty)


@dataclass
class Schema:
    tasks: list[str]
    categorical: list[str]
    numeric: list[str]
    columns: list[Column]
    bags: list[str] = field(default_factory=list)
    vectors: dict[str, int] = field(default_factory=dict)  # each vector column's length


def infer_schema(
    frame: pl.DataFrame | CodedFrame,
    source: str,
    tasks: list[str],
    categorical: list[str] = (),
    numeric: list[str] = (),
    exclude: list[str] = (),
    weight: str | None = None,
) -> Schema:
    """Roles for every column of `frame`; `tasks` must already be ordered main task first; `weight` is
    --weight-column's, no feature."""
    if weight is not None and weight not in frame.columns:
        raise MbtrainError(f"{source}: --weight-column {weight!r} not found; columns are {_shown(frame.columns)}")
    exclude = [*exclude, *([weight] if weight else [])]
    for flag, names in (("--tasks", tasks), ("--categorical", categorical), ("--numeric", numeric),
                        ("--exclude", exclude)):
        for name in names:
            if name not in frame.columns:
                raise MbtrainError(f"{source}: column {name!r} (from {flag}) not found; columns are "
                                   f"{_shown(frame.columns)}")
    for name in tasks:
        if name in categorical or name in numeric or name in exclude:
            raise MbtrainError(f"column {name!r} is a task label and cannot also be in --categorical, --numeric "
                               "or --exclude")
    for name in categorical:
        if frame.schema[name].is_nested() and bag_kind(frame.schema[name]) is None:
            raise MbtrainError(f"{source}: column {name!r} is {frame.schema[name]} and cannot be --categorical: only "
                               "lists of text or integers make bags")
    bags = [name for name in frame.columns
            if bag_kind(frame.schema[name]) and name not in {*exclude, *tasks, *numeric}]  # --numeric: a vector
    vectors = [name for name in frame.columns if name not in {*tasks, *exclude, *categorical}
               and is_number_list(frame.schema[name]) and (frame.schema[name].inner.is_float() or name in numeric)]
    vector_lengths = _vector_lengths(frame, vectors, source)
    stats = _column_stats(frame, source, not_features={*tasks, *exclude}) | _bag_stats(frame, bags)
    columns = []
    for name in frame.columns:
        dtype = frame.schema[name]
        distinct = stats.get(f"{name}\x00distinct")
        null_share = stats[f"{name}\x00nulls"] / frame.height
        lengths = None
        if name in bags:
            distinct, lengths = stats[f"{name}\x00elements"], (stats[f"{name}\x00mean"] or 0.0,
                                                                stats[f"{name}\x00longest"] or 0)
        if name in tasks:
            role, reason = "label", "task" + (" (main)" if name == tasks[0] else "")
        elif name == weight:
            role, reason = "excluded", "--weight-column"
        elif name in exclude:
            role, reason = "excluded", "--exclude"
        elif name in categorical:
            role, reason = ("bag", "--categorical") if name in bags else ("categorical", "--categorical")
        elif name in vector_lengths:
            role, reason = _vector(dtype, vector_lengths[name], null_share, name in numeric)
        elif name in numeric:
            if not (dtype.is_numeric() or dtype == pl.Boolean):
                raise MbtrainError(f"{source}: column {name!r} is {dtype} and cannot be --numeric")
            role, reason = "numeric", "--numeric"
        else:
            role, reason = _infer(name, dtype, distinct, null_share, frame.height)
        columns.append(Column(name, role, str(dtype), reason, distinct, null_share, lengths))
    features = [c for c in columns if c.role not in ("label", "excluded")]
    if not features:
        raise MbtrainError(f"{source}: no feature columns left besides the labels")
    return Schema(
        tasks=list(tasks),
        categorical=[c.name for c in columns if c.role.startswith("categorical")],
        numeric=[c.name for c in columns if c.role.endswith("numeric")],
        columns=columns,
        bags=[c.name for c in columns if c.role == "bag"],
        vectors={c.name: vector_lengths[c.name] for c in columns if c.role == "vector"},
    )


def _vector_lengths(frame: pl.DataFrame | CodedFrame, vectors: list[str], source: str) -> dict[str, int | None]:
    """Each vector column's length: an array's from its type, a list's from its rows, which must all have it (a null
    row aside; None where every row is null)."""
    lists = [name for name in vectors if isinstance(frame.schema[name], pl.List)]
    found: dict[str, Any] = {}
    if lists:
        table = frame.frame if isinstance(frame, CodedFrame) else frame
        found = table.select([e for name in lists for e in (pl.col(name).list.len().min().alias(f"{name}\x00shortest"),
                                                            pl.col(name).list.len().max().alias(f"{name}\x00longest"))]
                             ).row(0, named=True)
    lengths = {}
    for name in vectors:
        if name not in lists:
            lengths[name] = frame.schema[name].size
            continue
        shortest, longest = found[f"{name}\x00shortest"], found[f"{name}\x00longest"]
        if shortest != longest:
            raise MbtrainError(f"{source}: vector column {name!r} holds lists of different lengths ({shortest} and "
                               f"{longest}); every row's list needs the same length, or is null (or --exclude it)")
        lengths[name] = longest
    return lengths


def _vector(dtype: pl.DataType, length: int | None, null_share: float, flagged: bool) -> tuple[str, str]:
    """A vector column's role (`flagged`: by --numeric): a vector, unless there is nothing in it."""
    if null_share == 1.0:
        return "excluded", "all values null"
    if not length:
        return "excluded", "every list empty"
    why = "--numeric" if flagged else f"{'array' if isinstance(dtype, pl.Array) else 'list'} of floats"
    return "vector", f"{why}, length {length}"


def _bag_stats(frame: pl.DataFrame | CodedFrame, bags: list[str]) -> dict[str, Any]:
    """Each bag column's distinct elements and its lists' mean and longest length (a null list as empty)."""
    if not bags:
        return {}
    table = frame.frame if isinstance(frame, CodedFrame) else frame
    return table.select([e for name in bags for e in (
        pl.col(name).explode().drop_nulls().n_unique().alias(f"{name}\x00elements"),
        pl.col(name).list.len().fill_null(0).mean().alias(f"{name}\x00mean"),
        pl.col(name).list.len().max().alias(f"{name}\x00longest"))]).row(0, named=True)


def _column_stats(frame: pl.DataFrame | CodedFrame, source: str, not_features: set[str]) -> dict[str, int]:
    """Distinct (null counted as a value) and null counts: from a CodedFrame's codes, which encoder fitting
    then reuses, for the feature columns it can code; from polars aggregates otherwise (labels and
    --exclude'd columns need no codes). Floats are numeric whatever their distinct count: not counted."""
    counted = [c for c in frame.columns if not (frame.schema[c].is_float() or frame.schema[c].is_nested())]
    if not isinstance(frame, CodedFrame):
        return frame.select(
            [pl.col(c).n_unique().alias(f"{c}\x00distinct") for c in counted]
            + [pl.col(c).null_count().alias(f"{c}\x00nulls") for c in frame.columns]
        ).row(0, named=True)
    stats = {}
    for name in frame.columns:
        if codable(frame.schema[name]) and (name not in not_features or name not in frame.frame.columns):
            column = frame.column(name, source)
            stats[f"{name}\x00distinct"], stats[f"{name}\x00nulls"] = column.distinct, int(column.totals[-1])
        else:
            series = frame.frame.get_column(name)
            stats[f"{name}\x00nulls"] = series.null_count()
            if name in counted:
                stats[f"{name}\x00distinct"] = series.n_unique()
    return stats


def _infer(name: str, dtype: pl.DataType, distinct: int | None, null_share: float, rows: int) -> tuple[str, str]:
    if null_share == 1.0:
        return "excluded", "all values null"
    if dtype in (pl.String, pl.Categorical, pl.Enum) or isinstance(dtype, (pl.Categorical, pl.Enum)):
        if distinct == rows and rows >= 100:
            return "excluded", "every value distinct (a row id?)"
        return "categorical", "text"
    if dtype == pl.Boolean:
        return "categorical", "boolean"
    if dtype.is_integer():
        if distinct == rows and rows >= 100:
            return "excluded", "every value distinct (a row id?)"
        if ID_NAME.search(name):
            return "categorical", "integer, id-like name"
        if distinct <= SMALL_INT_CARDINALITY:
            return "categorical", f"integer, ≤{SMALL_INT_CARDINALITY} values"
        if distinct <= DUAL_INT_CARDINALITY:
            return "categorical+numeric", f"integer, ≤{DUAL_INT_CARDINALITY} values"
        return "numeric", f"integer, >{DUAL_INT_CARDINALITY} values"
    if dtype.is_float():
        return "numeric", "float"
    kind = bag_kind(dtype)
    if kind is not None:
        return "bag", f"list of {'text' if kind == 'str' else 'integers'}"
    if isinstance(dtype, (pl.List, pl.Array)):
        return "excluded", f"unsupported type {dtype}: bags are lists of text or integers, vectors of numbers"
    return "excluded", f"unsupported type {dtype}"


def check_funnel(labels: torch.Tensor, tasks: list[str], funnel: list[str] | None, source: str) -> None:
    """Refuse labels [rows, T] (columns in `tasks` order) where a funnel stage is 1 and the stage before it 0."""
    if funnel is None:
        return
    count, first = funnel_breaks(labels, tasks, funnel)
    if count:
        raise funnel_error(source, count, f"row index {first}", labels[first], tasks, funnel)


def funnel_breaks(labels: torch.Tensor, tasks: list[str], funnel: list[str]) -> tuple[int, int | None]:
    """(rows where a funnel stage is 1 and the stage before it 0, the first of them)."""
    staged = labels[:, [tasks.index(task) for task in funnel]]
    broken = (staged[:, 1:] > staged[:, :-1]).any(dim=1)
    count = int(broken.sum())
    return count, int(broken.nonzero()[0, 0]) if count else None


def funnel_error(source: str, count: int, where: str, row: torch.Tensor, tasks: list[str],
                 funnel: list[str]) -> MbtrainError:
    values = ", ".join(f"{task}={int(row[tasks.index(task)])}" for task in funnel)
    return MbtrainError(f"{source}: {count:,} row(s) break the funnel {' → '.join(funnel)} (a stage is 1 where the "
                        f"stage before it is 0); the first is {where}: {values}")


def group_keys(frame: pl.DataFrame | CodedFrame, source: str, column: str) -> torch.Tensor:
    """int64 [rows] keys of the --group-by column's values (a 63-bit hash, the same for the same value in
    every chunk of a file), NULL_GROUP where the value is null. Read as it is stored (read_coded's `plain`);
    categorical columns are hashed as their text, since their codes differ from chunk to chunk."""
    if column not in frame.columns:
        raise MbtrainError(f"{source}: --group-by column {column!r} not found; columns are {_shown(frame.columns)}")
    values = (frame.frame if isinstance(frame, CodedFrame) else frame).get_column(column)
    if values.dtype.is_nested():
        raise MbtrainError(f"{source}: --group-by column {column!r} holds {values.dtype}; give a column of scalar "
                           "keys (user, session)")
    if isinstance(values.dtype, pl.Categorical | pl.Enum):
        values = values.cast(pl.String)
    keys = pl.select(pl.when(values.is_null()).then(pl.lit(NULL_GROUP, pl.Int64))
                     .otherwise((values.hash(seed=0) // 2).cast(pl.Int64))).to_series()
    return torch.from_numpy(keys.to_numpy().copy())


def _shown(names: list[str], limit: int = 12) -> str:
    listed = ", ".join(names[:limit])
    return listed + (f", … ({len(names)} in all)" if len(names) > limit else "")
