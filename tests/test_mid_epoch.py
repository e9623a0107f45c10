"""--checkpoint-every: last.pt written inside an epoch, from which --resume takes the very steps the uninterrupted run
takes (in memory and streamed, with a balancer that keeps state)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mbtrain.train
from tests.helpers import make_frame, run_cli

SETTINGS = ["--tasks", "purchase,click", "--epochs", "2", "--batch-size", "32", "--threads", "1", "--patience", "0",
            "--hidden", "8", "--tower", "4", "--dropout", "0.1", "--checkpoint-every", "3", "--exclude", "row_id"]


def interrupt_at(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> None:
    """Stop the fit like Ctrl-C right after the mid-epoch checkpoint at `step` of `epoch` is written."""
    save = mbtrain.train.FitRecipe._save_checkpoint

    def saved_then_stopped(recipe: mbtrain.train.FitRecipe, best: bool, sample: dict | None,
                           position: mbtrain.train.Position | None = None) -> None:
        save(recipe, best, sample, position)
        if position is not None and recipe.epoch == epoch and position.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(mbtrain.train.FitRecipe, "_save_checkpoint", saved_then_stopped)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("balance", ["famo", "metabalance"])
def test_a_mid_epoch_checkpoint_resumes_to_the_uninterrupted_run(streamed: bool, balance: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "train.parquet"
    make_frame(400, seed=5).write_parquet(data, row_group_size=40)
    settings = [*SETTINGS, "--balance", balance, *(["--memory-budget", "1K"] if streamed else [])]
    straight = run_cli("fit", str(data), *settings, "--out", str(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    with monkeypatch.context() as patch:
        interrupt_at(patch, epoch=2, step=6)
        stopped = run_cli("fit", str(data), *settings, "--out", str(tmp_path / "split"))
    assert stopped.exit_code == 130, stopped.output
    checkpoint = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["position"]["step"] == 6
    resumed = run_cli("fit", "--resume", "--out", str(tmp_path / "split"))
    assert resumed.exit_code == 0, resumed.output
    one, two = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
                for name in ("straight", "split"))
    assert two["epoch"] == 2 and two["position"] is None
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=0, atol=0, msg=name)
    history = [(tmp_path / name / "history.jsonl").read_text().splitlines() for name in ("straight", "split")]
    for ours, theirs in zip(*history, strict=True):
        ours, theirs = json.loads(ours), json.loads(theirs)
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6) and ours["valid"] == theirs["valid"]


@pytest.mark.parametrize("value", ["0", "ten", "-3"])
def test_a_bad_interval_is_one_line(value: str, tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(100).write_parquet(data)
    result = run_cli("fit", str(data), "--tasks", "purchase,click", "--checkpoint-every", value, "--out",
                     str(tmp_path / "run"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--checkpoint-every" in result.stderr
    assert not (tmp_path / "run").exists()
