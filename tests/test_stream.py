"""Streaming Parquet path: file discovery, footer-only counts, the same schema / encoders / batches / losses as
the in-memory path, seeded local shuffling, row-group validation hold-out, and the path choice."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from mbtrain.config import ModelConfig
from mbtrain.data.batches import EncodedData
from mbtrain.data.encoders import Encoders
from mbtrain.data.labels import LabelColumns
from mbtrain.data.schema import infer_schema
from mbtrain.data.stream import (
    StreamingBatches,
    count_rows,
    fit_encoders_streaming,
    infer_schema_streaming,
    parquet_files,
    parse_memory_budget,
    read_parquet_files,
    row_groups,
    scan_row_groups,
    should_stream,
    split_row_groups,
)
from mbtrain.errors import MbtrainError
from mbtrain.models.scoring import ModelSpec, Predictions, predict_rows, score_rows
from tests.helpers import Adam, make_frame, run_cli

TASKS = ["purchase", "click"]
LABELS = LabelColumns(TASKS, ["binary"] * len(TASKS))
GROUP_ROWS = 50
SIZES = (250, 200, 150)  # three files, 12 row groups of 50 rows


def _frame(rows: int, seed: int) -> pl.DataFrame:
    """make_frame plus the column kinds it lacks: an id with nulls and rare values, a dual-role integer, a bool."""
    frame = make_frame(rows, seed)
    return frame.with_columns(
        pl.Series("item_id", [None if i % 17 == 0 else (i * 7 + seed) % 90 for i in range(rows)]),
        pl.Series("age", [18 + (i * 13 + seed) % 60 for i in range(rows)]),
        pl.Series("is_new", [(i + seed) % 3 == 0 for i in range(rows)]),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """A directory of three Parquet files (plus files to ignore) and the same rows as one in-memory frame."""
    folder = tmp_path_factory.mktemp("stream")
    frames, start = [], 0
    for seed, rows in enumerate(SIZES):
        frame = _frame(rows, seed).with_columns(pl.Series("row_id", range(start, start + rows)))
        frame.write_parquet(folder / f"part-{seed}.parquet", row_group_size=GROUP_ROWS)
        frames.append(frame)
        start += rows
    (folder / "_SUCCESS").write_text("")
    (folder / "notes.txt").write_text("not data")
    return folder, pl.concat(frames)


def _in_memory(frame: pl.DataFrame, min_frequency: int = 2) -> tuple[Encoders, EncodedData]:
    schema = infer_schema(frame, "f", TASKS)
    encoders = Encoders.fit(frame, schema.categorical, schema.numeric, min_frequency)
    labels = LABELS.read(frame, "f")
    return encoders, EncodedData(*encoders.encode(frame, "f"), labels)


def _assert_same_encoders(streamed: Encoders, fitted: Encoders) -> None:
    assert streamed.categorical == fitted.categorical  # same values in the same order, same kinds
    for ours, theirs in zip(streamed.numeric, fitted.numeric, strict=True):
        assert (ours.name, ours.log1p) == (theirs.name, theirs.log1p)
        assert ours.mean == pytest.approx(theirs.mean, rel=1e-9, abs=1e-12)
        assert ours.std == pytest.approx(theirs.std, rel=1e-9)


def _assert_same_batch(ours: EncodedData, theirs: EncodedData) -> None:
    assert torch.equal(ours.categorical, theirs.categorical)
    torch.testing.assert_close(ours.numeric, theirs.numeric, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours.labels, theirs.labels)


def test_parquet_files_take_a_file_a_directory_or_a_glob(dataset: tuple[Path, pl.DataFrame],
                                                         tmp_path: Path) -> None:
    folder, _ = dataset
    parts = [folder / f"part-{i}.parquet" for i in range(3)]
    assert parquet_files(folder) == parts  # sorted, _SUCCESS and notes.txt left out
    assert parquet_files(Path(f"{folder}/part-[12].parquet")) == parts[1:]
    assert parquet_files(parts[0]) == parts[:1]
    for source, message in ((tmp_path, "directory holds no [*].parquet files"),
                            (tmp_path / "*.parquet", "no file matches this pattern"),
                            (tmp_path / "missing.parquet", "file not found")):
        with pytest.raises(MbtrainError, match=message) as error:
            parquet_files(source)
        assert "\n" not in str(error.value)


def test_row_groups_and_counts_come_from_the_footers(dataset: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    folder, frame = dataset
    files = parquet_files(folder)
    parts = row_groups(files)
    assert len(parts) == 12 and count_rows(files) == frame.height == sum(p.rows for p in parts)
    assert [(p.index, p.offset) for p in parts if p.path == files[1]] == [(i, 50 * i) for i in range(4)]
    frame.drop("age").write_parquet(tmp_path / "other.parquet")
    with pytest.raises(MbtrainError, match="lacks column 'age'"):
        row_groups([files[0], tmp_path / "other.parquet"])
    (tmp_path / "text.parquet").write_text("a,b\n1,2\n")
    with pytest.raises(MbtrainError, match="not a readable Parquet file"):
        row_groups([tmp_path / "text.parquet"])
    assert read_parquet_files(files).equals(frame)


def test_streaming_schema_and_encoders_equal_the_in_memory_ones(dataset: tuple[Path, pl.DataFrame]) -> None:
    folder, frame = dataset
    parts = row_groups(parquet_files(folder))
    schema = infer_schema(frame, "f", TASKS)
    assert infer_schema_streaming(parts, "f", TASKS) == schema
    assert {"item_id", "age", "is_new"} <= set(schema.categorical) and {"age", "price"} <= set(schema.numeric)
    fitted, _ = _in_memory(frame)
    assert any(e.log1p for e in fitted.numeric) and not all(e.log1p for e in fitted.numeric)
    _assert_same_encoders(fit_encoders_streaming(scan_row_groups(parts), schema.categorical, schema.numeric, 2),
                          fitted)
    # the training rows only, with row groups held out in the middle of files
    train, _ = split_row_groups(parts, 0.3, seed=3)
    rows = pl.concat([frame.slice(sum(SIZES[: int(p.path.stem[-1])]) + p.offset, p.rows) for p in train])
    _assert_same_encoders(fit_encoders_streaming(scan_row_groups(train), schema.categorical, schema.numeric, 3),
                          Encoders.fit(rows, schema.categorical, schema.numeric, 3))
    capped = fit_encoders_streaming(scan_row_groups(parts), schema.categorical, schema.numeric, 1, max_vocab=3)
    _assert_same_encoders(capped, Encoders.fit(frame, schema.categorical, schema.numeric, 1, max_vocab=3))
    assert max(len(e.values) for e in capped.categorical) == 3


def test_unshuffled_batches_and_losses_equal_the_in_memory_path(dataset: tuple[Path, pl.DataFrame]) -> None:
    folder, frame = dataset
    encoders, data = _in_memory(frame)
    stream = StreamingBatches(row_groups(parquet_files(folder)), encoders, LABELS, buffer_rows=70)
    streamed = [batch for batch, _ in stream.batches(64)]
    assert len(stream) == len(data) and [len(b) for b in streamed] == [64] * 9 + [24]
    for i, batch in enumerate(streamed):
        _assert_same_batch(batch, data.take(torch.arange(64 * i, min(64 * (i + 1), len(data)))))
    spec = ModelSpec(TASKS, encoders, {**vars(ModelConfig()), "experts": 2, "hidden": [8], "tower": [4]})

    def losses(batches: list[EncodedData]) -> list[list[float]]:
        torch.manual_seed(0)
        model = spec.build()
        optimizer = Adam(model.parameters(), lr=0.01)
        history = []
        for batch in batches:
            step = F.binary_cross_entropy_with_logits(model(batch.categorical, batch.numeric), batch.labels,
                                                      reduction="none").mean(dim=0)
            optimizer.zero_grad()
            step.sum().backward()
            optimizer.step()
            history.append(step.tolist())
        return history

    assert losses(streamed) == losses([data.take(torch.arange(s, min(s + 64, len(data))))
                                       for s in range(0, len(data), 64)])


def test_shuffling_is_seeded_per_epoch_local_to_the_buffer_and_covers_every_row(
        dataset: tuple[Path, pl.DataFrame]) -> None:
    folder, frame = dataset
    parts = row_groups(parquet_files(folder))
    # row_id as the only categorical column, every value kept: its index is row_id + 1
    encoders = fit_encoders_streaming(scan_row_groups(parts), ["row_id"], [], min_frequency=1)
    stream = StreamingBatches(parts, encoders, LABELS, buffer_rows=2 * GROUP_ROWS)

    def epoch(number: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(7 * 1_000_003 + number)
        return [batch.categorical[:, 0] - 1 for batch, _ in stream.batches(32, generator)]

    first = epoch(1)
    assert [len(b) for b in first] == [32] * 18 + [24]
    assert torch.equal(torch.cat(first).sort().values, torch.arange(frame.height))  # each row once
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(1), strict=True))  # same seed, same epoch
    assert not torch.equal(torch.cat(first), torch.cat(epoch(2)))
    # the first buffer is two row groups, and the batches cut from it hold rows of those two only
    groups = {int(row) // GROUP_ROWS for row in torch.cat(first[:3])}
    assert len(groups) == 2
    assert not torch.equal(torch.cat(first[:3]).sort().values, torch.cat(first[:3]))  # shuffled inside


def _row_ids(batch: EncodedData) -> list[int]:
    """The row_id of each row, where row_id is the only categorical column with every value kept."""
    return (batch.categorical[:, 0] - 1).tolist()


def test_each_rank_reads_its_own_row_groups_and_all_ranks_take_the_same_steps(tmp_path: Path) -> None:
    """One file per row group: a rank's epoch works with the other rank's files gone, so it never opens them."""
    sizes = [50, 50, 50, 50, 50, 20, 50]  # rank 0 gets groups 0, 2, 4 (150 rows), rank 1 1, 3, 5, 6 (170 rows)
    firsts = [sum(sizes[:i]) for i in range(len(sizes))]

    def stream(folder: Path) -> StreamingBatches:
        folder.mkdir()
        for i, (rows, first) in enumerate(zip(sizes, firsts, strict=True)):
            frame = make_frame(rows, seed=i).with_columns(pl.Series("row_id", range(first, first + rows)))
            frame.write_parquet(folder / f"part-{i}.parquet")
        parts = row_groups(parquet_files(folder))
        encoders = fit_encoders_streaming(scan_row_groups(parts), ["row_id"], [], min_frequency=1)
        return StreamingBatches(parts, encoders, LABELS, buffer_rows=GROUP_ROWS)

    epochs = {}
    for rank in range(2):
        data = stream(tmp_path / f"rank{rank}")
        shards = data.shards(2)
        assert [[int(p.path.stem[-1]) for p in shard] for shard in shards] == [[0, 2, 4], [1, 3, 5, 6]]
        assert data.shards(1) == [data.parts] and data.steps(32, 2) == 6 and data.steps(32, 1) == 10
        for part in shards[1 - rank]:
            part.path.unlink()
        epochs[rank] = list(data.batches(32, torch.Generator().manual_seed(5), rank, world_size=2))
        ids = [i for batch, _ in epochs[rank] for i in _row_ids(batch)]
        mine = [i for p in shards[rank] for i in range(firsts[int(p.path.stem[-1])], firsts[int(p.path.stem[-1])]
                                                         + p.rows)]
        assert sorted(ids) == sorted(mine) and ids != sorted(ids)  # each row of the shard once, shuffled
    # equal steps, the same global rows on both ranks; rank 0's exhausted shard ends with an empty batch
    assert [rows for _, rows in epochs[0]] == [rows for _, rows in epochs[1]] == [64, 64, 64, 64, 54, 10]
    assert [len(b) for b, _ in epochs[0]] == [32, 32, 32, 32, 22, 0]
    assert [len(b) for b, _ in epochs[1]] == [32, 32, 32, 32, 32, 10]
    empty, _ = epochs[0][-1]
    assert empty.categorical.shape == (0, 1) and empty.numeric.shape == (0, 0) and empty.labels.shape == (0, 2)


def test_unshuffled_ranks_together_take_one_process_batches_of_row_groups_that_hold_a_batch(
        dataset: tuple[Path, pl.DataFrame]) -> None:
    """Row groups of exactly the per-rank batch: rank r reads groups r, r+2, …, and each global batch is the
    batch one process with twice the batch reads in file order (what the torchrun test relies on)."""
    folder, frame = dataset
    encoders, _ = _in_memory(frame)
    stream = StreamingBatches(row_groups(parquet_files(folder)), encoders, LABELS, buffer_rows=GROUP_ROWS)
    whole = list(stream.batches(2 * GROUP_ROWS))
    ranks = [list(stream.batches(GROUP_ROWS, rank=rank, world_size=2)) for rank in range(2)]
    assert [rows for _, rows in whole] == [rows for _, rows in ranks[0]] == [rows for _, rows in ranks[1]]
    for (batch, _), (first, _), (second, _) in zip(whole, *ranks, strict=True):
        assert torch.equal(batch.categorical, torch.cat([first.categorical, second.categorical]))
        assert torch.equal(batch.labels, torch.cat([first.labels, second.labels]))


def test_a_bad_label_names_its_file_and_row_group(dataset: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    _, frame = dataset
    encoders, _ = _in_memory(frame)
    bad = frame.head(150).with_columns(pl.when(pl.col("row_id") == 120).then(2).otherwise(pl.col("click"))
                                       .alias("click"))
    bad.write_parquet(tmp_path / "bad.parquet", row_group_size=GROUP_ROWS)
    stream = StreamingBatches(row_groups([tmp_path / "bad.parquet"]), encoders, LABELS, buffer_rows=GROUP_ROWS)
    with pytest.raises(MbtrainError, match=r"bad.parquet \(row group 2\): label column 'click' is not binary"):
        list(stream.batches(64))


def test_validation_holds_out_seeded_whole_row_groups(dataset: tuple[Path, pl.DataFrame]) -> None:
    folder, _ = dataset
    parts = row_groups(parquet_files(folder))
    train, valid = split_row_groups(parts, 0.2, seed=0)
    assert (train, valid) == split_row_groups(parts, 0.2, seed=0)
    assert sorted(train + valid, key=parts.index) == parts and not set(train) & set(valid)
    assert train == sorted(train, key=parts.index) and valid == sorted(valid, key=parts.index)
    assert 120 <= sum(p.rows for p in valid) < 120 + GROUP_ROWS
    assert {split_row_groups(parts, 0.2, seed)[1][0] for seed in range(8)} != {valid[0]}
    assert len(split_row_groups(parts, 0.99, seed=0)[0]) == 1  # something is always left to train on
    with pytest.raises(MbtrainError, match="single row group"):
        split_row_groups(parts[:1], 0.2, seed=0)


def test_label_rates_and_streamed_predictions_equal_the_in_memory_ones(dataset: tuple[Path, pl.DataFrame]) -> None:
    folder, frame = dataset
    encoders, data = _in_memory(frame)
    stream = StreamingBatches(row_groups(parquet_files(folder)), encoders, LABELS, buffer_rows=70)
    streamed, held = stream.label_sums(), data.label_sums()
    torch.testing.assert_close(streamed.mean(), held.mean())
    torch.testing.assert_close(streamed.count, held.count)
    torch.manual_seed(0)
    spec = ModelSpec(TASKS, encoders, dict(vars(ModelConfig())))
    model = Predictions(spec.build(), spec.task_set)
    probabilities, labels, groups = score_rows(model, stream)
    torch.testing.assert_close(probabilities, predict_rows(model, data.categorical, data.numeric))
    assert torch.equal(labels, data.labels) and groups is None


def test_the_path_is_chosen_by_the_memory_budget(dataset: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    folder, frame = dataset
    files = parquet_files(folder)
    assert should_stream(files, memory_budget_bytes=10_000)
    assert not should_stream(files, memory_budget_bytes=parse_memory_budget("1G"))
    frame.write_csv(tmp_path / "train.csv")
    assert not should_stream([tmp_path / "train.csv"], memory_budget_bytes=1)  # CSV is read in memory
    assert parse_memory_budget("512M") == 512 * 2**20
    assert parse_memory_budget("1.5GiB") == 3 * 2**29
    assert parse_memory_budget("auto") > 0


def test_ranks_on_one_machine_share_its_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = parse_memory_budget("auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # as torchrun --nproc-per-node 4 sets it
    assert parse_memory_budget("8G") == 2 * 2**30
    assert parse_memory_budget("auto") == auto // 4
    with pytest.raises(MbtrainError, match="--memory-budget 'lots'"):
        parse_memory_budget("lots")


def test_fit_streams_a_directory_beyond_the_memory_budget_and_resumes(dataset: tuple[Path, pl.DataFrame],
                                                                     tmp_path: Path) -> None:
    """Through the CLI: a tiny --memory-budget forces the streaming path; eval, predict and resume work on it."""
    folder, frame = dataset
    common = ["--tasks", "purchase,click", "--batch-size", "64", "--memory-budget", "1K", "--patience", "0",
              "--hidden", "8", "--experts", "2", "--threads", "1", "--exclude", "row_id"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = run_cli("fit", str(folder), *common, "--epochs", "2", "--out", str(straight))
    assert result.exit_code == 0, result.output
    assert "streamed" in result.stdout
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["train_rows"] + metrics["valid_rows"] == frame.height
    assert "held-out row groups" in metrics["evaluated_on"]
    assert run_cli("fit", str(folder), *common, "--epochs", "1", "--out", str(split)).exit_code == 0
    # a budget under which the data would now fit in memory: the resumed run must keep streaming
    assert run_cli("fit", "--resume", "--out", str(split), "--epochs", "2", "--memory-budget", "10T").exit_code == 0
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, msg=name)
    predictions = tmp_path / "p.parquet"
    result = run_cli("predict", str(straight), str(folder / "part-0.parquet"), "--output", str(predictions))
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(predictions).height == pl.read_parquet(folder / "part-0.parquet").height
    scored = tmp_path / "eval.json"
    assert run_cli("eval", str(straight), str(folder), "--json", str(scored)).exit_code == 0  # a directory too
    assert json.loads(scored.read_text())["tasks"]["click"]["rows"] == frame.height


def test_inspect_streams_like_fit_and_says_the_same(dataset: tuple[Path, pl.DataFrame]) -> None:
    folder, _ = dataset
    in_memory = run_cli("inspect", str(folder), "--tasks", "purchase,click")
    streamed = run_cli("inspect", str(folder), "--tasks", "purchase,click", "--memory-budget", "1K")
    assert in_memory.exit_code == 0 and streamed.exit_code == 0, in_memory.output + streamed.output
    assert streamed.stdout == in_memory.stdout
    assert "task purchase (main): binary (0/1), positive rate" in streamed.stdout


def test_streamed_training_takes_a_csv_validation_file(dataset: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    folder, _ = dataset
    valid = tmp_path / "valid.csv"
    _frame(80, seed=9).write_csv(valid)
    result = run_cli("fit", str(folder), "--tasks", "purchase,click", "--memory-budget", "1K", "--epochs", "1",
                     "--valid", str(valid), "--exclude", "row_id", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["valid_rows"] == 80 and metrics["evaluated_on"] == str(valid)


def test_no_shuffle_is_a_setting_of_streamed_training(dataset: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    """--no-shuffle / `shuffle = false` take the rows in file order, streamed or in memory."""
    folder, _ = dataset
    common = ["--tasks", "purchase,click", "--epochs", "1", "--threads", "1", "--exclude", "row_id"]
    (tmp_path / "ordered.toml").write_text("shuffle = false\n")
    result = run_cli("fit", str(folder), *common, "--memory-budget", "1K", "--config", str(tmp_path / "ordered.toml"),
                     "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["shuffle"] is False
    in_memory = run_cli("fit", str(folder), *common, "--no-shuffle", "--out", str(tmp_path / "in-memory"))
    assert in_memory.exit_code == 0, in_memory.output  # in row order: EncodedData.batches without a generator
    (tmp_path / "bad.toml").write_text("shuffle = 0\n")
    bad = run_cli("fit", str(folder), *common, "--config", str(tmp_path / "bad.toml"))
    assert bad.exit_code == 2 and "shuffle should be bool: got 0" in bad.stderr
