"""The learning-rate schedule: warm-up, constant or cosine, a function of the step alone (so resume needs no state)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mbtrain.config import RunConfig, peak_lr
from mbtrain.train import learning_rate
from tests.helpers import run_cli


def test_warmup_then_constant_or_cosine() -> None:
    steps = 10
    cosine = RunConfig().updated({"lr": 0.01, "schedule": "cosine", "warmup": 0.5, "epochs": 3})
    rates = [learning_rate(cosine, steps, step) for step in range(30)]
    assert rates[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])  # 0.5 epochs = 5 steps
    assert rates[5] == pytest.approx(0.01)
    assert rates[5 + 25 // 2] == pytest.approx(0.005 * (1 + math.cos(math.pi * 12 / 25)))
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False)) and rates[-1] < 1e-4
    constant = RunConfig()
    assert {learning_rate(constant, steps, step) for step in range(30)} == {0.01}


def test_the_default_rate_scales_down_with_the_global_batch_only() -> None:
    assert peak_lr(RunConfig().train) == 0.01  # batch 1024
    assert peak_lr(RunConfig().updated({"batch_size": 128}).train) == pytest.approx(0.00125)
    assert peak_lr(RunConfig().updated({"batch_size": 64}).train, world_size=2) == pytest.approx(0.00125)
    assert peak_lr(RunConfig().updated({"batch_size": 8192}).train) == 0.01  # never above
    assert peak_lr(RunConfig().updated({"batch_size": 128, "lr": 0.05}).train) == 0.05


def test_an_interrupted_run_resumes_on_the_same_schedule(data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["--batch-size", "64", "--threads", "1", "--patience", "0", "--epochs", "3"]
    flags = ["--tasks", "purchase,click", "--schedule", "cosine", "--warmup", "1", "--lr", "0.01", "--norm", "layer"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("fit", str(data_dir / "train.parquet"), *flags, *common, "--out", str(whole)).exit_code == 0

    def interrupt_after_epoch_1(entry: dict, *args: object) -> str:
        if entry["epoch"] == 1:  # its checkpoint is written: a Ctrl-C here is a real interruption
            raise KeyboardInterrupt
        return ""

    with monkeypatch.context() as patch:
        patch.setattr("mbtrain.train.history_line", interrupt_after_epoch_1)
        assert run_cli("fit", str(data_dir / "train.parquet"), *flags, *common, "--out", str(split)).exit_code == 130
    result = run_cli("fit", "--resume", "--out", str(split), *common)
    assert result.exit_code == 0, result.output

    def history(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]

    assert [row["lr"] for row in history(whole)] == [row["lr"] for row in history(split)]
    assert history(whole)[-1]["lr"] < 0.001 < history(whole)[0]["lr"] == 0.01
