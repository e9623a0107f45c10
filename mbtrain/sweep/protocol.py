"""The honest protocol's fixed parts: each seed's split of the rows into training, validation and test files,
written once and read by every run of that seed (so every comparison is paired on identical rows), and the
runs themselves: one ordinary run directory per method, configuration and seed.

Selection reads validation metrics only; the test rows are scored once per selected run (report.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mbtrain.checkpoint import write_atomic, write_text
from mbtrain.config import RunConfig, toml_text
from mbtrain.data.stream import parquet_files, read_files
from mbtrain.errors import MbtrainError
from mbtrain.sweep.grid import Grid

SPLITS = "splits"
RUNS = "runs"
CONFIGS = "configs"
FAILED = "failed"
DEFINITION = "definition.json"


@dataclass
class Split:
    """One seed's files: training rows, validation rows (selection), test rows (the report only)."""

    train: Path
    valid: Path
    test: Path


@dataclass
class Run:
    """One fit of the sweep: a method's configuration on one seed's split."""

    name: str  # <method>-<configuration>-seed<seed>
    method: str
    configuration: int  # its index among the method's configurations
    settings: dict[str, Any]  # what this configuration varies
    seed: int
    config: RunConfig  # everything fit needs, --valid included
    data: Path  # the training rows
    test: Path
    folder: Path  # the run directory
    config_file: Path  # the run's settings as a --config file

    @property
    def failure(self) -> Path:
        return self.folder.parent.parent / FAILED / f"{self.name}.txt"

    def status(self) -> str:
        """finished | interrupted (resumable) | failed | pending."""
        if (self.folder / "metrics.json").is_file():
            return "finished"
        if (self.folder / "checkpoints" / "last.pt").is_file():
            return "interrupted"
        if self.failure.is_file():
            return "failed"
        return "pending"


@dataclass(frozen=True)
class Holdout:
    """How the sweep holds rows out: test rows from `test`, else a `test_fraction` of the data; validation rows
    from --valid, else a --valid-fraction of the rest. By row, seeded per seed (the default); by `time_column`,
    the latest rows (test), the ones before them (validation), the same split for every seed, which then varies
    the initialisation and the order only; by `group_column`, whole groups (a user's rows never straddle two
    parts), seeded per seed."""

    test: Path | None = None
    test_fraction: float = 0.2
    time_column: str | None = None
    group_column: str | None = None

    def check(self, valid: str | None) -> None:
        """One error line for settings that cannot hold rows out (`valid`: --valid, a file of validation rows)."""
        if self.test is None and not 0.0 < self.test_fraction < 1.0:
            raise MbtrainError(f"--test-fraction must be in (0, 1): got {self.test_fraction}")
        if self.time_column and self.group_column:
            raise MbtrainError("--split-time and --split-group contradict each other: pick one")
        if (self.time_column or self.group_column) and self.test is not None and valid:
            flag = "--split-time" if self.time_column else "--split-group"
            raise MbtrainError(f"{flag} splits nothing when --test and --valid both give their rows: drop it, or one "
                               "of them")

    def to_dict(self) -> dict[str, Any]:
        return {"test": str(self.test.resolve()) if self.test else None, "test_fraction": self.test_fraction,
                "split_time": self.time_column, "split_group": self.group_column}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Holdout:
        """A sweep's definition.json (one of before --split-time holds no split keys: by row)."""
        return cls(Path(saved["test"]) if saved["test"] else None, saved["test_fraction"], saved.get("split_time"),
                   saved.get("split_group"))


def definition(data: Path, grid: Grid, holdout: Holdout) -> dict[str, Any]:
    """What makes two sweeps the same sweep: running another into the same folder is refused."""
    valid = grid.fixed.get("valid")
    return {"data": str(data.resolve()), **holdout.to_dict(), "valid": str(Path(valid).resolve()) if valid else None,
            "grid": grid.to_dict()}


def write_splits(folder: Path, data: Path, grid: Grid, holdout: Holdout) -> dict[int, Split]:
    """Each seed's split, written once (a file already there is that seed's: the split is a function of the
    data and the seed); by time, one split that every seed shares. Training rows are what remains."""
    valid = grid.fixed.get("valid")
    valid_fraction = grid.fixed.get("valid_fraction", RunConfig().data.valid_fraction)
    splits, frame = {}, None
    for seed in grid.seeds:
        where = folder / SPLITS / ("by-time" if holdout.time_column else f"seed{seed}")
        split = Split(where / "train.parquet", Path(valid) if valid else where / "valid.parquet",
                      holdout.test or where / "test.parquet")
        if not split.train.is_file():
            frame = frame if frame is not None else read_files(parquet_files(data))
            _write_split(frame, data, split, seed, holdout, valid is None, valid_fraction)
        splits[seed] = split
    return splits


def _write_split(frame: pl.DataFrame, data: Path, split: Split, seed: int, holdout: Holdout, hold_valid: bool,
                 valid_fraction: float) -> None:
    rows = frame.height
    tests = min(max(1, round(rows * holdout.test_fraction)), rows - 2) if holdout.test is None else 0
    valids = min(max(1, round((rows - tests) * valid_fraction)), rows - tests - 1) if hold_valid else 0
    if rows - tests - valids < 1:
        raise MbtrainError(f"{data}: {rows} rows are too few to split into training, validation and test rows")
    if holdout.time_column:
        parts = _by_time(frame, data, holdout.time_column, tests, valids)
    elif holdout.group_column:
        parts = _by_group(frame, data, holdout.group_column, seed, tests, valid_fraction if hold_valid else 0.0)
    else:
        order = np.random.default_rng(seed).permutation(rows)
        parts = {"test": order[:tests], "valid": order[tests : tests + valids], "train": order[tests + valids :]}
    split.train.parent.mkdir(parents=True, exist_ok=True)
    for name, rows_of in parts.items():
        if len(rows_of):  # the training file last: its presence says the seed's split is complete
            _write_parquet(frame[np.sort(rows_of)], getattr(split, name))


def _column(frame: pl.DataFrame, data: Path, name: str, flag: str) -> pl.Series:
    if name not in frame.columns:
        raise MbtrainError(f"{flag} {name}: {data} has no such column")
    column = frame[name]
    missing = column.null_count() + (int(column.is_nan().sum()) if column.dtype.is_float() else 0)
    if missing:
        raise MbtrainError(f"{flag} {name}: {missing:,} rows of {data} have no value there")
    return column


def _by_time(frame: pl.DataFrame, data: Path, name: str, tests: int, valids: int) -> dict[str, np.ndarray]:
    """The latest `tests` rows by the column to test, the `valids` before them to validation, the rest to
    training; each cut moved back to where a time begins, so that rows of one time (a day) share a part."""
    column = _column(frame, data, name, "--split-time")
    try:
        ordered = pl.DataFrame({"time": column, "row": np.arange(len(column))}).sort(["time", "row"])
    except pl.exceptions.PolarsError as exc:
        raise MbtrainError(f"--split-time {name}: its values cannot be ordered ({exc})") from None
    order, times = ordered["row"].to_numpy(), ordered["time"]
    starts = np.flatnonzero(np.concatenate([[True], (times[1:] != times[:-1]).to_numpy()]))  # each time's first row

    def cut(at: int) -> int:
        return int(starts[np.searchsorted(starts, at, side="right") - 1])

    rows = len(order)
    test_at = cut(rows - tests) if tests else rows
    valid_at = cut(test_at - valids) if valids else test_at
    if valid_at < 1 or (tests and test_at == valid_at and valids):
        raise MbtrainError(f"--split-time {name}: its {len(starts):,} distinct times are too few to split into "
                           "training, validation and test rows")
    return {"test": order[test_at:], "valid": order[valid_at:test_at], "train": order[:valid_at]}


def _by_group(frame: pl.DataFrame, data: Path, name: str, seed: int, tests: int, valid_fraction: float
              ) -> dict[str, np.ndarray]:
    """Whole groups in a seeded order: the first ones to the test rows until they hold `tests` rows, the next
    to validation until they hold `valid_fraction` of the rest, the others to training (one group at least)."""
    codes = _column(frame, data, name, "--split-group").rank("dense").to_numpy().astype(np.int64) - 1
    sizes = np.bincount(codes)
    order = np.random.default_rng(seed).permutation(len(sizes))

    def take(groups: np.ndarray, wanted: int) -> np.ndarray:
        """The first groups until they hold `wanted` rows (none for 0), never the last group."""
        if not wanted:
            return groups[:0]
        return groups[: min(int(np.searchsorted(np.cumsum(sizes[groups]), wanted)) + 1, len(groups) - 1)]

    test_groups = take(order, tests)
    rest = order[len(test_groups):]
    valid_groups = take(rest, max(1, round(int(sizes[rest].sum()) * valid_fraction)) if valid_fraction else 0)
    part = np.full(len(sizes), 2)  # 0 test, 1 validation, 2 training, by group
    part[test_groups], part[valid_groups] = 0, 1
    where = part[codes]
    if (tests and not len(test_groups)) or (valid_fraction and not len(valid_groups)):
        raise MbtrainError(f"--split-group {name}: {len(sizes):,} groups (the largest holds "
                           f"{sizes.max() / len(codes):.0%} of the rows) are too few to split into training, "
                           "validation and test rows")
    return {"test": np.flatnonzero(where == 0), "valid": np.flatnonzero(where == 1),
            "train": np.flatnonzero(where == 2)}


def plan_runs(folder: Path, grid: Grid, splits: dict[int, Split], chosen: dict[str, dict[str, Any]] | None = None
              ) -> list[Run]:
    """Every run of the sweep, method by method, configuration by configuration (the grid's, or with --trials the
    one `chosen` for each method by its search), seed by seed."""
    runs = []
    for method in grid.methods:
        configurations = grid.configurations(method) if chosen is None else [chosen[method]]
        for index, settings in enumerate(configurations):
            for seed in grid.seeds:
                split = splits[seed]
                name = f"{method}-{index}-seed{seed}"
                config = grid.config(method, settings, seed).updated({"valid": str(split.valid)})
                runs.append(Run(name, method, index, settings, seed, config, split.train, split.test,
                                folder / RUNS / name, folder / CONFIGS / f"{name}.toml"))
    return runs


def write_configs(runs: list[Run]) -> None:
    """Each run's settings as the --config file its fit reads (and plan.txt's commands name)."""
    for run in runs:
        run.config_file.parent.mkdir(parents=True, exist_ok=True)
        write_text(run.config_file, toml_text(run.config.flat()))


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    write_atomic(path, lambda temporary: frame.write_parquet(temporary))


def read_definition(folder: Path) -> dict[str, Any] | None:
    path = folder / DEFINITION
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        raise MbtrainError(f"{path}: not a sweep definition (corrupt JSON)") from None
    return {"split_time": None, "split_group": None, **saved}  # a sweep of before the split flags: by row
