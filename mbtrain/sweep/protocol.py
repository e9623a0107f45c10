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


def definition(data: Path, grid: Grid, test: Path | None, test_fraction: float) -> dict[str, Any]:
    """What makes two sweeps the same sweep: running another into the same folder is refused."""
    valid = grid.fixed.get("valid")
    return {"data": str(data.resolve()), "test": str(test.resolve()) if test else None, "test_fraction": test_fraction,
            "valid": str(Path(valid).resolve()) if valid else None, "grid": grid.to_dict()}


def check_test_fraction(test: Path | None, test_fraction: float) -> None:
    if test is None and not 0.0 < test_fraction < 1.0:
        raise MbtrainError(f"--test-fraction must be in (0, 1): got {test_fraction}")


def write_splits(folder: Path, data: Path, grid: Grid, test: Path | None, test_fraction: float) -> dict[int, Split]:
    """Each seed's split, written once (a file already there is that seed's: the split is a function of the
    data and the seed). Test rows: --test FILE, else a seeded --test-fraction of the data; validation rows: --valid
    FILE, else a seeded --valid-fraction of the rest; training rows: what remains."""
    valid = grid.fixed.get("valid")
    valid_fraction = grid.fixed.get("valid_fraction", RunConfig().data.valid_fraction)
    splits, frame = {}, None
    for seed in grid.seeds:
        where = folder / SPLITS / f"seed{seed}"
        split = Split(where / "train.parquet", Path(valid) if valid else where / "valid.parquet",
                      test or where / "test.parquet")
        if not split.train.is_file():
            frame = frame if frame is not None else read_files(parquet_files(data))
            _write_split(frame, data, split, seed, test is None, valid is None, test_fraction, valid_fraction)
        splits[seed] = split
    return splits


def _write_split(frame: pl.DataFrame, data: Path, split: Split, seed: int, hold_test: bool, hold_valid: bool,
                 test_fraction: float, valid_fraction: float) -> None:
    rows = frame.height
    order = np.random.default_rng(seed).permutation(rows)
    tests = min(max(1, round(rows * test_fraction)), rows - 2) if hold_test else 0
    valids = min(max(1, round((rows - tests) * valid_fraction)), rows - tests - 1) if hold_valid else 0
    if rows - tests - valids < 1:
        raise MbtrainError(f"{data}: {rows} rows are too few to split into training, validation and test rows")
    parts = {"test": order[:tests], "valid": order[tests : tests + valids], "train": order[tests + valids :]}
    split.train.parent.mkdir(parents=True, exist_ok=True)
    for name, rows_of in parts.items():
        if len(rows_of):  # the training file last: its presence says the seed's split is complete
            _write_parquet(frame[np.sort(rows_of)], getattr(split, name))


def plan_runs(folder: Path, grid: Grid, splits: dict[int, Split]) -> list[Run]:
    """Every run of the sweep, method by method, configuration by configuration, seed by seed."""
    runs = []
    for method in grid.methods:
        for index, settings in enumerate(grid.configurations(method)):
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
        return json.loads(path.read_text())
    except ValueError:
        raise MbtrainError(f"{path}: not a sweep definition (corrupt JSON)") from None
