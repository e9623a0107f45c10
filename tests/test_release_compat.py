"""A run directory written by mbtrain 0.1 (tests/fixtures/release-0.1-run, with the numbers that release gave)
still resumes, evaluates and exports: checkpoints and config.json are a contract across releases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "release-0.1-data.parquet"
EXPECTED = json.loads((FIXTURES / "release-0.1-expected.json").read_text())


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(FIXTURES / "release-0.1-run", copy)
    return copy


def _close(ours: dict, theirs: dict) -> None:
    for task, metrics in theirs.items():
        for key, value in metrics.items():
            assert ours[task][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (task, key)


def test_old_run_evaluates_as_it_did(old_run: Path, tmp_path: Path) -> None:
    result = run_cli("eval", str(old_run), str(DATA), "--json", str(tmp_path / "metrics.json"))
    assert result.exit_code == 0, result.output
    _close(json.loads((tmp_path / "metrics.json").read_text())["tasks"], EXPECTED["eval"])


def test_old_run_resumes_as_it_did(old_run: Path) -> None:
    result = run_cli("fit", str(DATA), "--resume", "--out", str(old_run), "--epochs", "3")
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (old_run / "history.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    expected = EXPECTED["resumed_epoch_3"]
    assert history[-1]["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    _close(history[-1]["valid"], expected["valid"])


def test_old_run_exports_and_predicts(old_run: Path, tmp_path: Path) -> None:
    exported = tmp_path / "model.pt"
    result = run_cli("export", str(old_run), "--output", str(exported))
    assert result.exit_code == 0, result.output
    predictions = tmp_path / "predictions.csv"
    result = run_cli("predict", str(exported), str(DATA), "--output", str(predictions))
    assert result.exit_code == 0, result.output
    assert predictions.read_text().splitlines()[0] == "pred_purchase,pred_click"


def test_a_checkpoint_without_the_streamed_flag_resumes(old_run: Path) -> None:
    """Checkpoints written before the streamed path existed lack the key: the run takes the path that fits."""
    import torch

    for name in ("last.pt", "best.pt"):
        path = old_run / "checkpoints" / name
        state = torch.load(path, weights_only=True)
        del state["streamed"]
        torch.save(state, path)
    result = run_cli("fit", str(DATA), "--resume", "--out", str(old_run), "--epochs", "3")
    assert result.exit_code == 0, result.output


def test_a_checkpoint_of_the_spec_and_model_alone_scores(old_run: Path, tmp_path: Path) -> None:
    import torch

    state = torch.load(old_run / "checkpoints" / "best.pt", weights_only=True)
    slim = tmp_path / "slim.pt"
    torch.save({key: state[key] for key in ("format", "spec", "model")}, slim)
    result = run_cli("eval", str(slim), str(DATA), "--json", str(tmp_path / "metrics.json"))
    assert result.exit_code == 0, result.output
    _close(json.loads((tmp_path / "metrics.json").read_text())["tasks"], EXPECTED["eval"])
