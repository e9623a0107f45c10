"""Parquet data larger than memory: a streaming encoder fit, then shuffled batches read row group by row group.

Which path: `should_stream(files, budget)` estimates from the Parquet footers what the in-memory path would
hold (every column as polars keeps it, the split copy, the encoded tensors) and streams only when that
exceeds the memory budget, so small data keeps the faster in-memory path.

Streaming keeps memory bounded by the budget, not by the data:
- the schema and the encoders come from polars' streaming engine (`infer_schema_streaming`,
  `fit_encoders_streaming`) and equal what the in-memory path gets from the same rows. Each query reads one
  column of one multi-file scan and holds aggregates, or a hash table of the column's distinct values (what
  a vocabulary needs anyway; a row-id column costs a table of all its values, unless --exclude'd);
- `StreamingBatches` reads row groups in a seeded random order, encodes them chunk by chunk and shuffles
  rows within a buffer of at most `buffer_rows` rows (plus one read chunk): shuffling is local to a few row
  groups, the price of never holding the file. With no generator it yields rows in file order, the very
  batches that slicing the in-memory tensors gives.

Under torchrun each rank reads only its own shard of the training row groups (`StreamingBatches.shards`:
fixed for the run, row-balanced from the footers) and cuts it into batches of `batch_size` rows; the global
batch of a step is the ranks' local batches together. Every rank knows every shard's rows from the
footers, hence the number of steps and each step's global rows (`global_rows`) without a collective; a
rank whose shard runs out first takes empty batches until the last one is done.

Validation holds out whole row groups, not rows: `split_row_groups` permutes the row groups with
`torch.Generator().manual_seed(seed)` and takes them in that order until they hold at least
`valid_fraction` of the rows (at least one row group, and at least one left for training). Finding held-out
rows scattered through every row group would mean reading all of the data for each validation pass; whole
row groups are skipped by the fit and by training, and read once per validation pass. A separate
validation file (`--valid`) is streamed the same way, as `row_groups([path])`.
"""

from __future__ import annotations

import glob
import heapq
import os
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mbtrain.data.batches import EncodedData, row_order
from mbtrain.data.coded import bag_kind, kind_of
from mbtrain.data.encoders import (
    BagEncoder,
    CategoricalEncoder,
    Encoders,
    NumericEncoder,
    VectorEncoder,
    count_tensor,
    value_counts_query,
    vocabulary_of,
)
from mbtrain.data.io import PARQUET_MAGIC, read_parquet, read_table
from mbtrain.data.labels import LabelColumns
from mbtrain.data.schema import Schema, funnel_breaks, funnel_error, group_keys, infer_schema
from mbtrain.distributed import ranks_on_this_node
from mbtrain.errors import MbtrainError, first_line
from mbtrain.tasks import LabelSums

READ_ROWS = 131_072  # rows decoded and encoded at once: big enough to amortise polars' per-call cost
VARIABLE_WIDTH = 16  # bytes a string takes in polars (its view), for the in-memory estimate
IN_MEMORY_OVERHEAD = 3.0  # in-memory peak / (rows × column widths): 2.4 measured by benchmarks/scale.py, + margin
BUFFER_SHARE = 0.25  # of the memory budget, for the shuffle buffer (it exists twice while being assembled)
ROW_INDEX = "__mbtrain_row"  # scan_row_groups' temporary column
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class RowGroup:
    """One row group of one file: the unit of shuffling, of validation hold-out and of reading."""

    path: Path
    index: int  # row group number within the file
    offset: int  # position of its first row within the file
    rows: int


def parquet_files(source: Path) -> list[Path]:
    """The files behind a data argument: a file as is, a directory's *.parquet files (not hidden or `_`-prefixed
    ones such as Spark's _SUCCESS), or a glob pattern's matches; sorted, so that the row order is stable."""
    text = str(source)
    if not source.exists() and any(ch in text for ch in "*?["):  # a real file named data[1].csv is a file
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise MbtrainError(f"{source}: no file matches this pattern")
        return files
    if source.is_dir():
        files = sorted(p for p in source.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise MbtrainError(f"{source}: directory holds no *.parquet files")
        return files
    if not source.exists():
        raise MbtrainError(f"{source}: file not found")
    return [source]


def row_groups(files: Sequence[Path]) -> list[RowGroup]:
    """Every non-empty row group, from the footers alone; the files must be Parquet with the same columns."""
    parts: list[RowGroup] = []
    first: pa.Schema | None = None
    for path in files:
        try:
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            raise MbtrainError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
        if first is None:
            first = schema
        else:
            _check_same_columns(path, schema, files[0], first)
        offset = 0
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            if rows:
                parts.append(RowGroup(path, index, offset, rows))
            offset += rows
    if not parts:
        raise MbtrainError(f"{files[0]}{' …' if len(files) > 1 else ''}: the Parquet data holds no rows")
    return parts


def _check_same_columns(path: Path, schema: pa.Schema, first_path: Path, first: pa.Schema) -> None:
    """Same names and the same types as polars reads them (string and large_string are one type there)."""
    theirs, ours = _polars_types(first), _polars_types(schema)
    for name, dtype in ours.items():
        if name not in theirs:
            raise MbtrainError(f"{path}: has column {name!r} that {first_path} lacks; all files need the same columns")
        if dtype != theirs[name]:
            raise MbtrainError(f"{path}: column {name!r} is {dtype} here but {theirs[name]} in {first_path}")
    for name in theirs:
        if name not in ours:
            raise MbtrainError(f"{path}: lacks column {name!r} that {first_path} has; all files need the same columns")


def _polars_types(schema: pa.Schema) -> dict[str, pl.DataType]:
    return dict(pl.from_arrow(schema.empty_table()).schema)


def count_rows(files: Sequence[Path]) -> int:
    """Rows in all files, from the footers (nothing else is read)."""
    return sum(part.rows for part in row_groups(files))


def estimate_in_memory_bytes(files: Sequence[Path]) -> int:
    """Roughly the in-memory path's peak for these files: rows × summed column widths × IN_MEMORY_OVERHEAD."""
    rows = count_rows(files)  # first: one clear line when a footer is unreadable
    schema = pq.read_schema(files[0])
    return int(rows * sum(_width(field.type) for field in schema) * IN_MEMORY_OVERHEAD)


def _width(dtype: pa.DataType) -> int:
    if pa.types.is_fixed_size_list(dtype):  # an array column (a vector): its elements
        return dtype.list_size * _width(dtype.value_type)
    try:
        return max(1, dtype.bit_width // 8)
    except ValueError:  # not fixed-width: strings, binary, nested
        return VARIABLE_WIDTH


def is_parquet(path: Path) -> bool:
    """By the magic bytes, as read_table decides."""
    with path.open("rb") as handle:
        return handle.read(4) == PARQUET_MAGIC


def should_stream(files: Sequence[Path], memory_budget_bytes: int) -> bool:
    """Whether the data needs the streaming path; a lone CSV file never does (only Parquet streams)."""
    if len(files) == 1 and files[0].is_file() and not is_parquet(files[0]):
        return False
    return estimate_in_memory_bytes(files) > memory_budget_bytes


def parse_memory_budget(text: str) -> int:
    """This process's bytes of the machine's budget: `512M`, `8G`, `1.5GiB`, `2000000000` (binary units) or
    `auto` (half the physical memory), shared equally by the ranks torchrun starts on this machine, each of
    which holds its own data (the whole file in memory, or its shuffle buffer)."""
    if text.strip().lower() == "auto":
        node = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
        if not match or float(match[1]) <= 0:
            raise MbtrainError(f"--memory-budget {text!r}: expected a size such as 512M or 8G, or auto")
        node = int(float(match[1]) * UNITS[match[2].lower()])
    return node // ranks_on_this_node()


def read_parquet_files(files: Sequence[Path]) -> pl.DataFrame:
    """Several Parquet files as one DataFrame, in file order: the in-memory path for a small directory or glob."""
    row_groups(files)  # one clear line for a non-Parquet file, mismatched columns or no rows at all
    return read_parquet(files)


def read_files(files: Sequence[Path]) -> pl.DataFrame:
    """The in-memory path's frame: one CSV or Parquet file as read_table reads it, or several Parquet files."""
    return read_table(files[0]) if len(files) == 1 else read_parquet_files(files)


def split_row_groups(parts: Sequence[RowGroup], valid_fraction: float,
                     seed: int) -> tuple[list[RowGroup], list[RowGroup]]:
    """(train, valid) row groups, each in file order: seeded whole row groups held out, see the module doc."""
    if len(parts) < 2:
        raise MbtrainError(f"{parts[0].path}: a single row group cannot be split into training and validation; "
                           "pass --valid FILE or rewrite the data with smaller row groups")
    order = torch.randperm(len(parts), generator=torch.Generator().manual_seed(seed)).tolist()
    target, held, chosen = valid_fraction * sum(p.rows for p in parts), 0, set()
    for i in order[: len(parts) - 1]:
        chosen.add(i)
        held += parts[i].rows
        if held >= target:
            break
    return ([p for i, p in enumerate(parts) if i not in chosen], [p for i, p in enumerate(parts) if i in chosen])


def scan_row_groups(parts: Sequence[RowGroup]) -> pl.LazyFrame:
    """A lazy scan of exactly these rows: one scan over their files (a concatenation of per-file scans costs
    polars memory per file), less the row ranges of the other row groups, dropped by row index."""
    files = list(dict.fromkeys(part.path for part in parts))
    first_row, total = {}, 0
    for path in files:
        first_row[path], total = total, total + pq.read_metadata(path).num_rows
    gaps, position = [], 0  # [start, end) row ranges to drop
    for start, rows in sorted((first_row[part.path] + part.offset, part.rows) for part in parts):
        if start > position:
            gaps.append((position, start))
        position = max(position, start + rows)
    if position < total:
        gaps.append((position, total))
    scan = pl.scan_parquet(files, glob=False, hive_partitioning=False, row_index_name=ROW_INDEX if gaps else None)
    if not gaps:
        return scan
    dropped = pl.any_horizontal([pl.col(ROW_INDEX).is_between(start, end, closed="left") for start, end in gaps])
    return scan.filter(~dropped).drop(ROW_INDEX)


def _collect_by_column(scan: pl.LazyFrame, expressions: list[pl.Expr]) -> dict[str, Any]:
    """One row of aggregates, collected by the streaming engine one source column at a time: a single query
    over many columns buffers data for its slower branches (its peak memory grows with the rows:
    docs/benchmarks.md), while one query per column stays flat and is no slower."""
    groups: dict[tuple[str, ...], list[pl.Expr]] = {}
    for expression in expressions:
        groups.setdefault(tuple(expression.meta.root_names()), []).append(expression)
    row: dict[str, Any] = {}
    for group in groups.values():
        row.update(_collect(scan.select(group)).row(0, named=True))
    return row


def _collect(query: pl.LazyFrame) -> pl.DataFrame:
    """A streaming query's result; damaged Parquet pages surface here as one clear line."""
    try:
        return query.collect(engine="streaming")
    except pl.exceptions.PolarsError as exc:
        raise MbtrainError(f"unreadable Parquet data while streaming ({first_line(exc)})") from None


class _ScannedTable:
    """The little of a DataFrame that infer_schema reads (columns, schema, height, one select of aggregates),
    answered by streaming queries. If infer_schema took a LazyFrame and a row count, this could go."""

    def __init__(self, scan: pl.LazyFrame, rows: int) -> None:
        self.schema = scan.collect_schema()
        self.columns = self.schema.names()
        self.height = rows
        self._scan = scan

    def select(self, expressions: list[pl.Expr]) -> pl.DataFrame:
        return pl.DataFrame([_collect_by_column(self._scan, expressions)])


def infer_schema_streaming(parts: Sequence[RowGroup], source: str, tasks: list[str], categorical: list[str] = (),
                           numeric: list[str] = (), exclude: list[str] = (), weight: str | None = None) -> Schema:
    """infer_schema's roles for these rows, from one streaming pass (distinct and null counts per column)."""
    table = _ScannedTable(scan_row_groups(parts), sum(p.rows for p in parts))
    return infer_schema(table, source, tasks, categorical, numeric, exclude, weight)  # type: ignore[arg-type]


def fit_encoders_streaming(scan: pl.LazyFrame, categorical: list[str], numeric: list[str],
                           min_frequency: int, max_vocab: int | None = None, bags: list[str] = (),
                           max_bag: int = 50, vectors: Mapping[str, int] | None = None) -> Encoders:
    """Encoders.fit's result for the rows of `scan` (e.g. `scan_row_groups(train_parts)`), from polars'
    streaming engine one column at a time (see _collect_by_column): a group-by count per categorical column,
    moments per numeric one and per vector column (each of its elements')."""
    schema = scan.collect_schema()
    moments = _collect_by_column(scan, [e for name in numeric
                                        for e in (NumericEncoder.moments(name) + NumericEncoder.skewness(name)
                                                  + NumericEncoder.log_moments(name))])
    vector_encoders = [VectorEncoder(name, length) for name, length in (vectors or {}).items()]
    for vector in vector_encoders:  # one query per vector column, as per scalar one
        moments |= _collect(vector.unnested(scan, schema[vector.name]).select(vector.moments())).row(0, named=True)
    return Encoders(
        [CategoricalEncoder(name, kind_of(schema[name]),
                            _streamed_vocabulary(scan, schema, name, min_frequency, max_vocab))
         for name in categorical],
        [*(NumericEncoder.from_moments(name, moments) for name in numeric),
         *(e for vector in vector_encoders for e in vector.fitted(moments))],
        [_bag_encoder(scan, name, min_frequency, max_vocab, max_bag) for name in bags],
        vector_encoders,
    )


def _bag_encoder(scan: pl.LazyFrame, name: str, min_frequency: int, max_vocab: int | None,
                 max_bag: int) -> BagEncoder:
    """BagEncoder.fit's result, from two streaming queries: the longest list, and the elements' vocabulary."""
    elements = _elements(scan, name, max_bag)
    values = _streamed_vocabulary(elements, elements.collect_schema(), name, min_frequency, max_vocab)
    longest = _collect(scan.select(pl.col(name).list.len().max())).item()
    return BagEncoder(name, bag_kind(scan.collect_schema()[name]), values, max_bag,
                      max(1, min(max_bag, int(longest or 0))))


def _streamed_vocabulary(scan: pl.LazyFrame, schema: pl.Schema, name: str, min_frequency: int,
                         max_vocab: int | None) -> pl.Series:
    """One column's vocabulary: its value counts from the streaming engine (a hash table of its distinct values,
    what the vocabulary holds anyway), ordered as the in-memory fit orders them, by the same code."""
    return vocabulary_of(_collect(value_counts_query(scan, schema, name, min_frequency)), name, min_frequency,
                         max_vocab)


def _elements(scan: pl.LazyFrame, name: str, max_bag: int) -> pl.LazyFrame:
    """A bag column's elements, those of each list's last `max_bag`, as one column of that name."""
    return scan.select(pl.col(name).list.tail(max_bag).explode())


def value_counts_streaming(scan: pl.LazyFrame, name: str, max_bag: int | None = None) -> torch.Tensor:
    """The counts of one column's non-null values (a bag's: of the elements of each list's last `max_bag`), from
    the streaming engine."""
    if max_bag is not None:
        scan = _elements(scan, name, max_bag)
    return count_tensor(_collect(value_counts_query(scan, scan.collect_schema(), name)).get_column("count"))


def buffer_rows_for(memory_budget_bytes: int, encoders: Encoders, tasks: list[str]) -> int:
    """Shuffle-buffer rows that fit BUFFER_SHARE of the budget, counting the encoded bytes of a row twice
    (the chunks and their concatenation coexist briefly); never less than one read chunk."""
    row_bytes = 8 * encoders.slots + 4 * len(encoders.numeric) + 4 * len(tasks)
    return max(READ_ROWS, int(memory_budget_bytes * BUFFER_SHARE) // (2 * row_bytes))


class StreamingBatches:
    """Encoded mini-batches read from Parquet row groups: EncodedData's `batches` for data that does not fit.

    Memory holds the shuffle buffer (at most `buffer_rows` + READ_ROWS rows, encoded), never the data; under
    torchrun each rank reads its own shard of the row groups (see the module doc)."""

    streamed = True

    def __init__(self, parts: Sequence[RowGroup], encoders: Encoders, labels: LabelColumns, buffer_rows: int,
                 group_by: str | None = None) -> None:
        self.parts = list(parts)
        self.encoders = encoders
        self.labels = labels
        self.tasks = labels.names
        self.buffer_rows = buffer_rows
        self.group_by = group_by  # validation sets with --group-by: chunks() carry the group keys
        names = (encoders.columns + labels.columns
                 + [group_by] * bool(group_by))
        self.columns = list(dict.fromkeys(names))

    def __len__(self) -> int:
        return sum(part.rows for part in self.parts)

    def shards(self, world_size: int) -> list[list[RowGroup]]:
        """Each rank's row groups, in file order: every row group in turn goes to the rank holding the fewest
        rows so far (the lowest such rank on a tie), so shards differ by at most one row group's rows and
        row groups of equal size are dealt round-robin. Fixed for the run, so a rank re-reads the same files
        every epoch (its machine's page cache serves them); the epochs still differ in each rank's row group
        order and buffer shuffle, and each global batch mixes world_size buffers."""
        shards: list[list[RowGroup]] = [[] for _ in range(world_size)]
        loads = [(0, rank) for rank in range(world_size)]  # a heap of (rows so far, rank)
        for part in self.parts:
            rows, rank = heapq.heappop(loads)
            shards[rank].append(part)
            heapq.heappush(loads, (rows + part.rows, rank))
        return shards

    def steps(self, batch_size: int, world_size: int = 1) -> int:
        """Steps per epoch: the batches of the shard with the most rows."""
        return max(-(-sum(p.rows for p in shard) // batch_size) for shard in self.shards(world_size))

    def batches(self, batch_size: int, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[EncodedData, int]]:
        """(this rank's batch, rows in the global batch) for each of the epoch's `steps`, reading `rank`'s
        shard only: with a generator (seeded per epoch, as the in-memory path does), its row groups in a
        permuted order and rows shuffled within the buffer; without, file order, so that one process yields
        the same batches as cutting the in-memory tensors in order. Batches hold batch_size rows, all but the
        shard's last; then empty batches until the step count, so that every rank joins every collective."""
        shards = self.shards(world_size)
        shard_rows = [sum(p.rows for p in shard) for shard in shards]
        parts = shards[rank]
        if generator is not None:
            parts = [parts[i] for i in torch.randperm(len(parts), generator=generator).tolist()]
        taken = 0
        for batch in self._local_batches(parts, batch_size, generator):
            yield batch, global_rows(shard_rows, batch_size, taken)
            taken += 1
        empty = EncodedData(torch.empty(0, self.encoders.slots, dtype=torch.int64),
                            torch.empty(0, len(self.encoders.numeric)), torch.empty(0, len(self.tasks)),
                            weights=torch.empty(0) if self.labels.weight else None)
        for step in range(taken, self.steps(batch_size, world_size)):
            yield empty, global_rows(shard_rows, batch_size, step)

    def _local_batches(self, parts: Sequence[RowGroup], batch_size: int,
                       generator: torch.Generator | None) -> Iterator[EncodedData]:
        held: list[EncodedData] = []
        rows = 0
        for chunk in self._chunks(parts):
            held.append(chunk)
            rows += len(chunk)
            if rows >= self.buffer_rows:
                buffer, held = self._concat(held), []
                rest = yield from _cut(buffer, batch_size, generator, last=False)
                held, rows = [rest], len(rest)
        if rows:
            yield from _cut(self._concat(held), batch_size, generator, last=True)

    def _concat(self, parts: list[EncodedData]) -> EncodedData:
        """The chunks as one set, their bags' slots padded to the most any chunk has."""
        width = max(part.categorical.shape[1] for part in parts)
        weighted = self.labels.weight is not None
        return EncodedData(torch.cat([self.encoders.widened(p.categorical, width) for p in parts]),
                           torch.cat([p.numeric for p in parts]), torch.cat([p.labels for p in parts]),
                           weights=torch.cat([p.weights for p in parts]) if weighted else None)

    def label_sums(self) -> LabelSums:
        """Per task, the sums of its labels, reading the label columns only: what the task types fit from."""
        total = LabelSums.of(torch.empty(0, len(self.tasks)))
        for frame, source in _frames(self.parts, self.labels.columns):
            total = total + LabelSums.of(self.labels.read(frame, source), self.labels.weights(frame, source))
        return total

    def check_funnel(self, funnel: list[str], source: str) -> None:
        """Refuse rows where a funnel stage is 1 and the stage before it 0 (schema.check_funnel), reading the
        label columns only, and counting them all before saying where the first is."""
        count, first = 0, None
        for part in self.parts:
            row = part.offset  # of the part's next frame, within its file
            for frame, where in _frames([part], self.tasks):
                labels = self.labels.read(frame, where)
                broken, at = funnel_breaks(labels, self.tasks, funnel)
                if broken and first is None:
                    first = (f"row index {row + at} of {part.path}", labels[at])
                count, row = count + broken, row + frame.height
        if first is not None:
            raise funnel_error(source, count, *first, self.tasks, funnel)

    def chunks(self) -> Iterator[EncodedData]:
        """Every row in file order, READ_ROWS at a time at most (scoring accepts any chunk size)."""
        return self._chunks(self.parts)

    def _chunks(self, parts: Sequence[RowGroup]) -> Iterator[EncodedData]:
        for frame, source in _frames(parts, self.columns):
            groups = group_keys(frame, source, self.group_by) if self.group_by else None
            yield EncodedData(*self.encoders.encode(frame, source), self.labels.read(frame, source),
                              groups=groups, weights=self.labels.weights(frame, source))


def global_rows(shard_rows: Sequence[int], batch_size: int, step: int) -> int:
    """Rows in global batch `step` (from 0) when each rank cuts its shard of `shard_rows[rank]` rows into
    batches of batch_size rows, the last one short: what each rank divides its summed losses by."""
    return sum(min(batch_size, max(0, rows - step * batch_size)) for rows in shard_rows)


def _frames(parts: Sequence[RowGroup], columns: list[str]) -> Iterator[tuple[pl.DataFrame, str]]:
    """The row groups' columns as DataFrames of at most READ_ROWS rows, with a source naming file and row group."""
    for part in parts:
        source = f"{part.path} (row group {part.index})"
        try:
            with pq.ParquetFile(part.path) as reader:
                for batch in reader.iter_batches(batch_size=READ_ROWS, row_groups=[part.index], columns=columns):
                    yield pl.from_arrow(batch), source
        except (OSError, pa.ArrowException) as exc:
            raise MbtrainError(f"{source}: unreadable Parquet data ({first_line(exc)})") from None


def _cut(buffer: EncodedData, batch_size: int, generator: torch.Generator | None,
         last: bool) -> Generator[EncodedData, None, EncodedData]:
    """Yield the buffer's full batches (and, if `last`, the short one); return the rows left over, which join
    the next buffer so that only the last batch of a shard is short."""
    rows = len(buffer)
    order = row_order(rows, generator)
    end = rows if last else rows - rows % batch_size
    for start in range(0, end, batch_size):
        yield buffer.take(order[start : min(start + batch_size, end)])
    return buffer.take(order[end:])
