"""Session fixtures: generated data files and one trained run shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_frame, run_cli


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    make_frame(600, seed=0).write_parquet(folder / "train.parquet")
    make_frame(200, seed=1).write_csv(folder / "test.csv")
    return folder


@pytest.fixture(scope="session")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small MetaBalance MMoE run shared by the eval / predict / export tests."""
    out = tmp_path_factory.mktemp("runs") / "run"
    result = run_cli("fit", str(data_dir / "train.parquet"), "--tasks", "purchase,click", "--balance",
                     "metabalance", "--epochs", "3", "--batch-size", "32", "--lr", "0.01", "--out", str(out),
                     "--threads", "1")
    assert result.exit_code == 0, result.output
    return out
