"""From a data path and the run's settings to what training reads: column roles, encoders (fitted on the
training rows unless a resumed run brings its own) and the training and validation rows, held in memory or
streamed from Parquet row groups where memory would not hold them. `fit` and `inspect` share it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import torch

from mbtrain.data.batches import EncodedData, Rows, split_rows
from mbtrain.data.coded import CodedFrame
from mbtrain.data.encoders import Encoders, capped_rows, count_tensor, element_counts, vocabulary_size
from mbtrain.data.io import read_coded
from mbtrain.data.labels import LabelColumns, label_types, read_states
from mbtrain.data.schema import Schema, check_funnel, group_keys, infer_schema
from mbtrain.data.stream import (
    StreamingBatches,
    buffer_rows_for,
    fit_encoders_streaming,
    infer_schema_streaming,
    is_parquet,
    parquet_files,
    parse_memory_budget,
    read_files,
    row_groups,
    scan_row_groups,
    should_stream,
    split_row_groups,
    value_counts_streaming,
)
from mbtrain.distributed import any_rank, from_main
from mbtrain.errors import MbtrainError
from mbtrain.tasks import LabelSums, TaskSet, TaskSettings, check_funnel_types

if TYPE_CHECKING:
    from mbtrain.config import RunConfig

Labelled = list[tuple[Any, str]]  # (a label tensor [rows, T] or streamed rows, the source it came from)


@dataclass
class Prepared:
    schema: Schema
    encoders: Encoders
    train: Rows
    valid: Rows
    valid_source: str
    storage: str  # how the data is held, for the summary: "in memory" or "streamed, shuffle buffer N rows"
    tasks: TaskSet  # fitted on the training labels, or the resumed run's
    sums: LabelSums | None  # the training labels' (None for a resumed run, which does not start its towers again)


def prepare(config: RunConfig, data_path: Path, encoders: Encoders | None = None,
            streamed: bool | None = None, tasks: TaskSet | None = None) -> Prepared:
    """Read, validate, split and encode; encoders and the tasks' statistics are fitted on the training rows unless
    `encoders` and `tasks` (a resumed run's) are given. Validation is config.data.valid, else a seeded held-out
    share. Data whose in-memory path would exceed --memory-budget (a big Parquet file, directory or glob) is
    streamed instead; a resumed run keeps its path (`streamed`), as the other one holds out different validation
    rows."""
    files, budget, fits = _locate(config, data_path)
    if streamed is None:
        streamed = any_rank(not fits)  # one path for all ranks, even where machines' budgets differ
    if streamed:
        return _prepare_streaming(config, files, str(data_path), encoders, budget, tasks)
    return _prepare_in_memory(config, _read_coded(files, _read_as_stored(config)), str(data_path), encoders, tasks)


def _read_as_stored(config: RunConfig, validation: bool = False) -> list[str]:
    """Columns read as they are stored: the labels, the weights, and the --group-by column of the data validation
    comes from (the training file's only when it holds the validation rows)."""
    grouped = config.data.group_by and (validation or not config.data.valid)
    weight = config.data.weight_column if not validation else None  # validation's metrics are unweighted
    return config.ordered_tasks + ([weight] if weight else []) + ([config.data.group_by] if grouped else [])


def _label_columns(config: RunConfig, table: Any, source: str, tasks: TaskSet | None
                   ) -> tuple[LabelColumns, dict[str, str]]:
    """The labels to read: each task's type (the resumed run's, --task-type's, or inferred from `table`) and why."""
    settings = config.data
    if tasks is not None:
        types = {name: (kind, "the resumed run's") for name, kind in zip(tasks.names, tasks.types, strict=True)}
    else:
        types = label_types(table, source, config.ordered_tasks, settings.task_type)
    kinds = {name: kind for name, (kind, _) in types.items()}
    check_funnel_types(kinds, config.funnel_tasks)
    if config.funnel_tasks and settings.missing_labels == "skip":
        raise MbtrainError("--missing-labels skip cannot go with a funnel (--funnel, --model esmm or aitm): each "
                           "stage is labelled on every row, 0 where the stage before it is 0")
    states = [task.state for task in tasks.tasks] if tasks is not None else read_states(table, source, kinds)
    labels = LabelColumns(config.ordered_tasks, list(kinds.values()), settings.missing_labels, settings.weight_column,
                          states)
    return labels, {name: reason for name, (_, reason) in types.items()}


def _fitted(config: RunConfig, labels: LabelColumns, sums: LabelSums, source: str) -> TaskSet:
    settings = config.data
    for task, transform in settings.target_transform.items():
        kind = labels.types[labels.names.index(task)]
        if kind != "regression":
            raise MbtrainError(f"--target-transform {task}={transform}: task {task!r} is {kind}; only a regression "
                               "task has a target transform")
    tasks = TaskSet.fit(dict(zip(labels.names, labels.types, strict=True)), sums,
                        TaskSettings(settings.target_transform, settings.regression_loss), source,
                        labels.states)
    names = tasks.output_names()
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MbtrainError(f"--tasks: two tasks' predictions would both be called {repeated[0]!r} (a multiclass task's "
                           "classes name its columns); rename a column")
    return tasks


def _features(config: RunConfig) -> tuple[list[str], list[str], list[str], str | None]:
    """What decides the features' roles: --categorical, --numeric, --exclude and --weight-column (no feature)."""
    settings = config.data
    return settings.categorical, settings.numeric, settings.exclude, settings.weight_column


def _check_funnel(config: RunConfig, labelled: Labelled) -> None:
    """Refuse rows that break the funnel (a stage 1 where the stage before it is 0) in every file the run reads:
    the training data whole, held-out rows included, and the validation file."""
    funnel, tasks = config.funnel_tasks, config.ordered_tasks
    if funnel is None:
        return
    for labels, source in labelled:
        if isinstance(labels, torch.Tensor):
            check_funnel(labels, tasks, funnel, source)
        else:
            labels.check_funnel(funnel, source)


@dataclass
class Description:
    """What `inspect` shows of the data, as `fit` would see it."""

    schema: Schema
    rows: int
    sums: LabelSums  # per task, over the rows with its label: the positive rate, a target's mean, the coverage
    types: list[str]  # each task's type
    type_reasons: dict[str, str]  # why
    states: list[dict[str, Any]]  # what each task's type read its column with (a multiclass task's classes)
    broken: str | None  # with a funnel: what breaks it, where rows do
    capped: dict[str, tuple[int, int]]  # with --max-vocab: per categorical column and bag, (values dropped, their
    # rows; a bag's: its elements)
    table: list[tuple[str, int]]  # each categorical column's and bag's rows of the embedding table, in its order


def describe(config: RunConfig, data_path: Path) -> Description:
    """The data as `fit` would see it (over all its rows), streamed where fit streams."""
    files, _, fits = _locate(config, data_path)
    tasks, settings = config.ordered_tasks, config.data
    source = str(data_path)
    if not fits:
        parts = row_groups(files)
        schema = infer_schema_streaming(parts, source, tasks, *_features(config))
        reader, reasons = _label_columns(config, scan_row_groups(parts), source, None)
        reader.missing, reader.weight = "skip", None  # inspect reports each task's coverage, in rows
        labels: Any = StreamingBatches(parts, Encoders([], []), reader, buffer_rows=1)
        sums, rows = labels.label_sums(), sum(part.rows for part in parts)

        def counts(name: str) -> torch.Tensor:
            cut = settings.max_bag if name in schema.bags else None
            return value_counts_streaming(scan_row_groups(parts), name, cut)
    else:
        coded = _read_coded(files, _read_as_stored(config))
        schema = infer_schema(coded, source, tasks, *_features(config))
        reader, reasons = _label_columns(config, coded, source, None)
        reader.missing, reader.weight = "skip", None  # inspect reports each task's coverage, in rows
        labels = reader.read(coded, source)
        sums, rows = LabelSums.of(labels), coded.height

        def counts(name: str) -> torch.Tensor:
            if name in schema.bags:
                return count_tensor(element_counts(coded.frame.get_column(name), settings.max_bag, source)["count"])
            return coded.column(name, source).totals[:-1]
    broken = None
    try:
        _check_funnel(config, [(labels, source)])
    except MbtrainError as exc:
        broken = str(exc)
    counted = {name: counts(name) for name in [*schema.categorical, *schema.bags]}
    capped = {} if settings.max_vocab is None else {
        name: capped_rows(found, settings.min_frequency, settings.max_vocab) for name, found in counted.items()}
    table = [(name, vocabulary_size(found, settings.min_frequency, settings.max_vocab) + 1)  # + unknown's row
             for name, found in counted.items()]
    return Description(schema, rows, sums, reader.types, reasons, reader.states, broken, capped, table)


def _locate(config: RunConfig, data_path: Path) -> tuple[list[Path], int, bool]:
    """(the data's files, the memory budget in bytes, whether the in-memory path fits in it)."""
    budget = parse_memory_budget(config.data.memory_budget)
    files = parquet_files(data_path)
    return files, budget, not should_stream(files, budget)


def _read_coded(files: list[Path], tasks: list[str]) -> CodedFrame:
    """The in-memory path's table: Parquet text features left dictionary-encoded (the labels are parsed as
    they are); several files are first checked to be Parquet with the same columns."""
    if len(files) > 1:
        row_groups(files)  # one clear line for a non-Parquet file, mismatched columns or no rows at all
    return read_coded(files, plain=tasks)


def _fit_encoders(config: RunConfig, frame: CodedFrame, schema: Schema, source: str,
                  rows: torch.Tensor | None = None) -> Encoders:
    settings = config.data
    return Encoders.fit(frame, schema.categorical, schema.numeric, settings.min_frequency, rows=rows, source=source,
                        max_vocab=settings.max_vocab, bags=schema.bags, max_bag=settings.max_bag,
                        vectors=schema.vectors)


def _prepare_in_memory(config: RunConfig, frame: CodedFrame, source: str, encoders: Encoders | None,
                       tasks: TaskSet | None) -> Prepared:
    """Roles, encoders and the encoded tensors all from each column's codes, made once (data/coded.py)."""
    settings = config.data
    schema = infer_schema(frame, source, config.ordered_tasks, *_features(config))
    reader, _ = _label_columns(config, frame, source, tasks)
    labels, weights = reader.read(frame, source), reader.weights(frame, source)
    _check_funnel(config, [(labels, source)])
    if settings.valid:
        valid_source = str(Path(settings.valid))
        valid_frame = _read_coded(parquet_files(Path(valid_source)), _read_as_stored(config, validation=True))
        valid_labels = reader.read(valid_frame, valid_source)  # bad labels fail before any fitting
        _check_funnel(config, [(valid_labels, valid_source)])
        valid_groups = group_keys(valid_frame, valid_source, settings.group_by) if settings.group_by else None
        encoders = encoders or _fit_encoders(config, frame, schema, source)
        train = EncodedData(*encoders.encode(frame, source), labels, weights=weights)
        valid = EncodedData(*encoders.encode(valid_frame, valid_source), valid_labels, groups=valid_groups)
    else:
        if frame.height < 2:
            raise MbtrainError(f"{source}: needs at least 2 rows to hold out a validation split")
        groups = group_keys(frame, source, settings.group_by) if settings.group_by else None
        train_rows, valid_rows = split_rows(frame.height, settings.valid_fraction, config.train.seed)
        # fitted on the training rows only, without copying them out of the frame
        encoders = encoders or _fit_encoders(config, frame, schema, source, train_rows)
        everything = EncodedData(*encoders.encode(frame, source), labels, groups=groups, weights=weights)
        train = EncodedData(everything.categorical, everything.numeric, labels, rows=train_rows, weights=weights)
        valid, valid_source = everything.take(valid_rows), f"{source} (held-out {settings.valid_fraction:.0%})"
    sums = None if tasks is not None else train.label_sums()
    tasks = tasks or _fitted(config, reader, sums, source)
    return Prepared(schema, encoders, train, valid, valid_source, "in memory", tasks, sums)


def _prepare_streaming(config: RunConfig, files: list[Path], source: str, encoders: Encoders | None,
                       budget: int, tasks: TaskSet | None) -> Prepared:
    """Roles and encoders from streaming passes, batches read row group by row group (data/stream.py).

    The row groups of the split come from the footers, on every rank; the passes over the rows (roles, and
    encoders unless given, the funnel check) run on rank 0 alone under torchrun, which hands them to the
    others."""
    settings = config.data
    parts = row_groups(files)
    valid_files = parquet_files(Path(settings.valid)) if settings.valid else []
    if settings.valid:
        train_parts, valid_source = parts, settings.valid
        valid_parts = row_groups(valid_files) if is_parquet(valid_files[0]) else []
        if not valid_parts and len(valid_files) > 1:
            raise MbtrainError(f"--valid {settings.valid}: matches several non-Parquet files; give one CSV file")
    else:
        train_parts, valid_parts = split_row_groups(parts, settings.valid_fraction, config.train.seed)
        valid_source = f"{source} (held-out row groups, {sum(p.rows for p in valid_parts):,} rows)"

    def roles_and_encoders() -> tuple[Schema, Encoders, LabelColumns]:
        schema = infer_schema_streaming(parts, source, config.ordered_tasks, *_features(config))
        _check_columns(config, schema, valid_files[0] if settings.valid else parts[0].path, bool(valid_parts))
        reader, _ = _label_columns(config, scan_row_groups(parts), source, tasks)
        if encoders is not None:
            return schema, encoders, reader
        return schema, fit_encoders_streaming(scan_row_groups(train_parts), schema.categorical, schema.numeric,
                                              settings.min_frequency, settings.max_vocab, schema.bags,
                                              settings.max_bag, schema.vectors), reader

    schema, encoders, reader = from_main(roles_and_encoders)
    unweighted = dataclasses.replace(reader, weight=None)  # validation reads no weights: its metrics are plain
    buffer = buffer_rows_for(budget, encoders, config.ordered_tasks)
    train = StreamingBatches(train_parts, encoders, reader, buffer)
    if valid_parts:
        valid: Rows = StreamingBatches(valid_parts, encoders, unweighted, buffer, settings.group_by)
    else:  # a CSV validation file: read whole, as CSV does not stream
        frame = read_files(valid_files)
        groups = group_keys(frame, settings.valid, settings.group_by) if settings.group_by else None
        valid = EncodedData(*encoders.encode(frame, settings.valid), reader.read(frame, settings.valid),
                            groups=groups)
    if config.funnel_tasks is not None:  # one pass over the label columns (held-out row groups included), rank 0
        labelled: Labelled = [(StreamingBatches(parts, encoders, reader, buffer), source)]
        if settings.valid:
            labelled.append((valid if valid_parts else valid.labels, settings.valid))
        from_main(lambda: _check_funnel(config, labelled))
    sums = None if tasks is not None else from_main(train.label_sums)  # one pass over the label columns, rank 0
    tasks = tasks or _fitted(config, reader, sums, source)
    return Prepared(schema, encoders, train, valid, valid_source, f"streamed, shuffle buffer {buffer:,} rows",
                    tasks, sums)


def _check_columns(config: RunConfig, schema: Schema, validation_file: Path, parquet_valid: bool) -> None:
    """The --group-by column where validation reads it, and a Parquet --valid file's columns, from one footer."""
    present = set(pq.read_schema(validation_file).names) if is_parquet(validation_file) else None
    group_by = config.data.group_by
    if group_by and present is not None and group_by not in present:
        raise MbtrainError(f"{validation_file}: --group-by column {group_by!r} not found")
    if config.data.valid and parquet_valid:
        missing = [c for c in schema.columns if c.role != "excluded" and c.name not in present]
        if missing:
            raise MbtrainError(f"{validation_file}: lacks column {missing[0].name!r} that the training data has")
