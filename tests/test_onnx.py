"""ONNX export (the mbtrain[onnx] extra): self-checked, predicted and evaluated through onnxruntime like the run
itself; without the extra, one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from tests.helpers import make_bag_frame, run_cli


def test_an_onnx_export_scores_like_the_run(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    exported = tmp_path / "model.onnx"
    result = run_cli("export", str(trained_run), "--output", str(exported), "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert "(onnx; checked on" in " ".join(result.stdout.split()) and not result.stderr
    test = str(data_dir / "test.csv")
    from_run, from_onnx = tmp_path / "run.csv", tmp_path / "onnx.csv"
    assert run_cli("predict", str(trained_run), test, "--output", str(from_run)).exit_code == 0
    assert run_cli("predict", str(exported), test, "--output", str(from_onnx)).exit_code == 0
    torch.testing.assert_close(torch.tensor(pl.read_csv(from_onnx).to_numpy()),
                               torch.tensor(pl.read_csv(from_run).to_numpy()), rtol=1e-5, atol=1e-6)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exported))
    spec = json.loads(session.get_modelmeta().custom_metadata_map["mbtrain.json"])
    assert spec["tasks"] == ["purchase", "click"] and [i.name for i in session.get_inputs()] == ["categorical",
                                                                                                 "numeric"]
    evaluated = run_cli("eval", str(exported), test, "--json", str(tmp_path / "m.json"))
    assert evaluated.exit_code == 0, evaluated.output
    ours = json.loads((trained_run / "metrics.json").read_text())["tasks"].keys()
    assert json.loads((tmp_path / "m.json").read_text())["tasks"].keys() == ours


def test_an_onnx_export_takes_the_bags_tensor(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    make_bag_frame(300, seed=0).write_parquet(tmp_path / "train.parquet")
    make_bag_frame(100, seed=1).write_parquet(tmp_path / "test.parquet")
    out = tmp_path / "run"
    assert run_cli("fit", str(tmp_path / "train.parquet"), "--tasks", "click,purchase", "--main-task", "purchase",
                   "--epochs", "1", "--exclude", "row_id", "--model", "ple", "--funnel", "--out",
                   str(out)).exit_code == 0
    exported = tmp_path / "model.onnx"
    result = run_cli("export", str(out), "--output", str(exported), "--format", "onnx")
    assert result.exit_code == 0, result.output
    import onnxruntime

    assert [i.name for i in onnxruntime.InferenceSession(str(exported)).get_inputs()] == ["categorical", "numeric",
                                                                                         "bags"]
    predictions = [tmp_path / "run.parquet", tmp_path / "onnx.parquet"]
    for model, target in zip((out, exported), predictions, strict=True):
        assert run_cli("predict", str(model), str(tmp_path / "test.parquet"), "--output", str(target),
                       "--conditional").exit_code == 0
    torch.testing.assert_close(torch.tensor(pl.read_parquet(predictions[1]).to_numpy()),
                               torch.tensor(pl.read_parquet(predictions[0]).to_numpy()), rtol=1e-5, atol=1e-6)


def test_without_the_extra_onnx_is_one_clear_line(trained_run: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    result = run_cli("export", str(trained_run), "--output", str(tmp_path / "m.onnx"), "--format", "onnx")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "pip install 'mbtrain[onnx]'" in result.stderr and not (tmp_path / "m.onnx").exists()

    (tmp_path / "other.onnx").write_bytes(b"not a model")
    result = run_cli("predict", str(tmp_path / "other.onnx"), str(tmp_path / "x.csv"), "--output",
                     str(tmp_path / "p.csv"))
    assert result.exit_code == 2 and "mbtrain[onnx]" in result.stderr


def test_a_file_that_is_not_an_onnx_export_is_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    (tmp_path / "other.onnx").write_bytes(b"not a model")
    pl.DataFrame({"a": [1]}).write_csv(tmp_path / "x.csv")
    result = run_cli("predict", str(tmp_path / "other.onnx"), str(tmp_path / "x.csv"), "--output",
                     str(tmp_path / "p.csv"))
    assert result.exit_code == 2 and "not an mbtrain ONNX export" in result.stderr


def test_an_onnx_export_is_named_onnx(trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    result = run_cli("export", str(trained_run), "--output", str(tmp_path / "m.pt"), "--format", "onnx")
    assert result.exit_code == 2 and "must end in .onnx" in result.stderr and not (tmp_path / "m.pt").exists()
