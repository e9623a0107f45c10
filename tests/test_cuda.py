"""The GPU path: marked `cuda`, skipped where torch sees no CUDA device (CI has none). Run them with
`pytest -m cuda` on a GPU machine (benchmarks/gpu_check.sh runs them with the rest of the suite and the speed
figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mbtrain.models import Inputs, ModelConfig, build_model
from tests.helpers import assert_split_metabalance_equals_full, make_bag_frame, run_cli, seeded_batch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CARDS = [5, 7, 3]


@pytest.mark.parametrize("name", ["mmoe", "ple", "esmm"])
def test_split_metabalance_is_exact_on_the_gpu(name: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(name, embed_dim=4, hidden=[8, 6], experts=3, tower=[5], dropout=0.0)
    inputs = Inputs(CARDS, num_numeric=2, num_tasks=3)
    full, fast = build_model(config, inputs).double().cuda(), build_model(config, inputs).double().cuda()
    fast.load_state_dict(full.state_dict())
    batches = [tuple(t.cuda() for t in seeded_batch(step, CARDS)) for step in range(3)]
    assert_split_metabalance_equals_full(full, fast, batches, segments=full.shared_segments())


@pytest.mark.parametrize("budget", [[], ["--memory-budget", "1K"]], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("model", [["--model", "mmoe"], ["--model", "ple", "--funnel"]])
def test_fit_on_the_gpu_matches_the_cpu(model: list[str], budget: list[str], tmp_path: Path) -> None:
    """The same run on the GPU and on the CPU: the same validation metrics to float tolerance (index_add on CUDA
    sums in another order)."""
    data = tmp_path / "train.parquet"
    make_bag_frame(600, seed=0).write_parquet(data, row_group_size=100)
    common = ["--tasks", "click,purchase", "--main-task", "purchase", "--epochs", "2", "--batch-size", "64",
              "--exclude", "row_id", "--balance", "metabalance", *model, *budget]
    metrics = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        result = run_cli("fit", str(data), *common, "--device", device, "--out", str(out))
        assert result.exit_code == 0, result.output
        assert device in result.stdout
        metrics[device] = json.loads((out / "metrics.json").read_text())["tasks"]
    for task, values in metrics["cpu"].items():
        assert metrics["cuda"][task]["auc"] == pytest.approx(values["auc"], abs=1e-3)
        assert metrics["cuda"][task]["logloss"] == pytest.approx(values["logloss"], rel=1e-3)
    exported = tmp_path / "model.pt"
    assert run_cli("export", str(tmp_path / "cuda"), "--output", str(exported)).exit_code == 0
