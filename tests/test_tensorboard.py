"""--tensorboard: event files with training, balancer and validation scalars; resume appends; the extra is optional."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_events_hold_losses_balancer_ratios_metrics_and_resume_appends(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('tasks = "purchase,click"\nbalance = "metabalance"\ntensorboard = true\n')
    out = tmp_path / "run"
    common = ["--batch-size", "32", "--threads", "1", "--out", str(out)]
    result = run_cli("fit", str(data_dir / "train.parquet"), "--config", str(config), "--epochs", "2", *common)
    assert result.exit_code == 0, result.output
    scalars = _scalars(out)
    steps_per_epoch = 17  # 540 training rows in batches of 32
    assert [step for step, _ in scalars["train_loss/purchase"]] == list(range(1, 2 * steps_per_epoch, 20))
    ratio_tags = [tag for tag in scalars if tag.startswith("grad_norm_ratio/click/")]
    assert "grad_norm_ratio/click/network.embedding.table.weight/0" in ratio_tags  # per column of the table
    assert len(ratio_tags) > 2
    assert not any(tag.startswith("grad_norm_ratio/purchase/") for tag in scalars)  # the main task is the yardstick
    for metric in ("auc", "logloss", "pr_auc", "calibration", "ne"):
        assert [step for step, _ in scalars[f"valid/purchase/{metric}"]] == [17, 34]
    history = [line for line in (out / "history.jsonl").read_text().splitlines() if line]
    assert len(history) == 2 and scalars["lr"][0][1] == pytest.approx(0.01 * 32 / 1024)  # default lr at batch 32

    result = run_cli("fit", "--resume", "--epochs", "3", *common)
    assert result.exit_code == 0, result.output
    scalars = _scalars(out)
    assert [step for step, _ in scalars["valid/click/auc"]] == [17, 34, 51]
    assert len(list((out / "tensorboard").iterdir())) == 2  # the resumed run appended a second events file


def test_without_the_extra_the_flag_is_one_error_line(data_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    out = tmp_path / "run"
    result = run_cli("fit", str(data_dir / "train.parquet"), "--tasks", "purchase,click", "--tensorboard",
                     "--out", str(out))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "mbtrain: error: --tensorboard needs the tensorboard package: pip install 'mbtrain[tensorboard]'"]
    assert not out.exists()


def test_validations_inside_epochs_land_at_their_steps(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("fit", str(data_dir / "train.parquet"), "--tasks", "purchase,click", "--tensorboard",
                     "--epochs", "2", "--batch-size", "32", "--validate-every", "8", "--threads", "1",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    assert [step for step, _ in _scalars(out)["valid/purchase/auc"]] == [8, 16, 17, 25, 33, 34]  # 17 steps an epoch
