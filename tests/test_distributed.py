"""torchrun with 2 gloo processes takes exactly the steps of one process with twice the batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_frame, run_cli

SETTINGS = ["--tasks", "purchase,click", "--patience", "0", "--threads", "1", "--seed", "3", "--hidden", "8",
            "--experts", "2", "--tower", "4", "--device", "cpu"]


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "mbtrain", "fit", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "train.parquet"
    make_frame(500, seed=0).write_parquet(path)  # 450 training rows: the last global batch is uneven
    return path


@pytest.mark.parametrize("balance", ["none", "metabalance"])
def test_two_ranks_match_one_process_with_twice_the_batch(balance: str, data: Path, tmp_path: Path) -> None:
    torchrun(str(data), *SETTINGS, "--balance", balance, "--epochs", "2", "--batch-size", "32",
             "--out", str(tmp_path / "two"))
    result = run_cli("fit", str(data), *SETTINGS, "--balance", balance, "--epochs", "2", "--batch-size", "64",
                     "--out", str(tmp_path / "one"))
    assert result.exit_code == 0, result.output
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    if balance == "metabalance":
        torch.testing.assert_close(two["balancer"]["moving_norms"], one["balancer"]["moving_norms"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote nothing of its own


def test_a_distributed_run_resumes(data: Path, tmp_path: Path) -> None:
    common = [*SETTINGS, "--balance", "metabalance", "--batch-size", "32"]
    torchrun(str(data), *common, "--epochs", "2", "--out", str(tmp_path / "straight"))
    torchrun(str(data), *common, "--epochs", "1", "--out", str(tmp_path / "split"))
    torchrun("--resume", "--out", str(tmp_path / "split"), "--epochs", "2")
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert split["epoch"] == 2
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(split["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
