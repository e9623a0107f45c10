"""DeviceFeed: every mode yields Rows.batches' batches, in the same order, for data in memory (with and without a
row index) and streamed, in one process and as a rank's slice; the resident copy lasts across epochs; and a
fit's history rows carry the data-wait share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mbtrain.config import RunConfig
from mbtrain.data.batches import EncodedData, Rows
from mbtrain.data.feed import MODES, DeviceFeed, auto_mode
from mbtrain.data.prepare import prepare
from mbtrain.errors import MbtrainError
from tests.helpers import make_frame, run_cli

TASKS = ["purchase", "click"]
CPU = torch.device("cpu")
KINDS = ("indexed", "compact", "streamed")  # in memory with a row index, without one; streamed


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 rows in row groups of 50."""
    path = tmp_path_factory.mktemp("feed") / "train.parquet"
    make_frame(500, seed=3).write_parquet(path, row_group_size=50)
    return path


def _training_rows(path: Path, streamed: bool) -> Rows:
    config = RunConfig().updated({"tasks": TASKS, "exclude": ["row_id"], "memory_budget": "1K" if streamed else None})
    return prepare(config, path).train


@pytest.fixture(scope="module")
def sets(data_file: Path) -> dict[str, Rows]:
    indexed = _training_rows(data_file, streamed=False)
    assert isinstance(indexed, EncodedData) and indexed.rows is not None
    streamed = _training_rows(data_file, streamed=True)
    assert streamed.streamed
    return {"indexed": indexed, "compact": indexed.take(torch.arange(len(indexed))), "streamed": streamed}


def _batches(source: Rows | DeviceFeed, seed: int | None, rank: int, world_size: int) -> list[tuple[EncodedData, int]]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(source.batches(32, generator, rank, world_size))


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
@pytest.mark.parametrize("seed", [7, None], ids=["shuffled", "in-order"])
@pytest.mark.parametrize(("mode", "kind"), [(mode, kind) for mode in MODES for kind in KINDS
                                          if (mode, kind) != ("resident", "streamed")])  # refused: test_bad_modes
def test_every_mode_yields_the_rows_batches(mode: str, kind: str, seed: int | None, rank: int, world_size: int,
                                            sets: dict[str, Rows]) -> None:
    rows = sets[kind]
    ours = _batches(DeviceFeed(rows, CPU, mode), seed, rank, world_size)
    theirs = _batches(rows, seed, rank, world_size)
    assert len(ours) == len(theirs) == rows.steps(32, world_size)
    for (batch, global_rows), (expected, expected_rows) in zip(ours, theirs, strict=True):
        assert global_rows == expected_rows
        for name in ("categorical", "numeric", "labels"):
            torch.testing.assert_close(getattr(batch, name), getattr(expected, name), rtol=0, atol=0, equal_nan=True)


def test_on_the_cpu_the_feed_is_direct_and_hands_out_the_rows_own_batches(sets: dict[str, Rows],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rows = sets["compact"]
    feed = DeviceFeed(rows, CPU)
    assert feed.mode == auto_mode(rows, CPU) == "direct"
    own = iter([])
    monkeypatch.setattr(rows, "batches", lambda *_: own)
    assert feed.batches(32) is own


def test_prefetch_draws_one_batch_ahead(sets: dict[str, Rows], monkeypatch: pytest.MonkeyPatch) -> None:
    rows, drawn = sets["compact"], []
    own = rows.batches

    def counted(*args: object) -> object:
        for item in own(*args):
            drawn.append(item)
            yield item

    monkeypatch.setattr(rows, "batches", counted)
    batches = DeviceFeed(rows, CPU, "prefetch").batches(32)
    next(batches)
    assert len(drawn) == 2  # the second batch's copy is on its way before the first is handed out
    assert len(list(batches)) == len(drawn) - 1 == rows.steps(32) - 1


def test_the_resident_copy_lasts_across_epochs(sets: dict[str, Rows]) -> None:
    rows = sets["indexed"]
    feed = DeviceFeed(rows, CPU, "resident")
    assert feed.resident is None
    _batches(feed, 1, 0, 1)
    resident = feed.resident
    assert resident is not None and resident.rows is None and len(resident) == len(rows)
    pointers = [t.data_ptr() for t in (resident.categorical, resident.numeric, resident.labels)]
    _batches(feed, 2, 0, 1)
    assert feed.resident is resident
    assert pointers == [t.data_ptr() for t in (resident.categorical, resident.numeric, resident.labels)]


def test_bad_modes_are_one_line(sets: dict[str, Rows]) -> None:
    for rows, mode, message in ((sets["streamed"], "resident", "needs the training rows in memory"),
                                (sets["compact"], "eager", "expected one of direct, resident, prefetch")):
        with pytest.raises(MbtrainError, match=message) as error:
            DeviceFeed(rows, CPU, mode)
        assert "\n" not in str(error.value)


def test_history_rows_carry_the_data_share(data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("fit", str(data_file), "--tasks", ",".join(TASKS), "--exclude", "row_id", "--epochs", "1",
                     "--batch-size", "64", "--threads", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert 0 < row["data_share"] < 1
