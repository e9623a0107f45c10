"""The GPU path: marked `cuda`, skipped where torch sees no CUDA device (CI has none). Run them with
`pytest -m cuda` on a GPU machine (benchmarks/gpu_check.sh runs them with the rest of the suite and the speed
figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mbtrain.config import RunConfig
from mbtrain.data.feed import DeviceFeed
from mbtrain.data.prepare import prepare
from mbtrain.models import Inputs, ModelConfig, build_model
from tests.helpers import assert_split_metabalance_equals_full, make_bag_frame, make_frame, run_cli, seeded_batch

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


@pytest.mark.parametrize(("budget", "mode"), [(None, "resident"), ("1K", "prefetch")], ids=["in-memory", "streamed"])
def test_the_feed_picks_its_mode_and_gives_the_cpu_batches(budget: str | None, mode: str, tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(500, seed=0).write_parquet(data, row_group_size=50)
    config = RunConfig().updated({"tasks": ["purchase", "click"], "exclude": ["row_id"], "memory_budget": budget})
    rows = prepare(config, data).train
    feed = DeviceFeed(rows, torch.device("cuda"))
    assert feed.mode == mode
    for rank, world_size in ((0, 1), (1, 2)):
        ours = feed.batches(32, torch.Generator().manual_seed(5), rank, world_size)
        theirs = rows.batches(32, torch.Generator().manual_seed(5), rank, world_size)
        for (batch, global_rows), (expected, expected_rows) in zip(ours, theirs, strict=True):
            assert global_rows == expected_rows and batch.categorical.is_cuda and batch.labels.is_cuda
            assert torch.equal(batch.categorical.cpu(), expected.categorical)
            torch.testing.assert_close(batch.numeric.cpu(), expected.numeric, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(batch.labels.cpu(), expected.labels)
