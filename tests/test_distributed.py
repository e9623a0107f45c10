"""torchrun with 2 gloo processes takes exactly the steps of one process with twice the batch: in memory, where
every rank slices each global batch, and streamed, where each rank reads its own shard of the row groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from typer.testing import Result

from mbtrain.balance import BALANCERS, Setup, build_balancer
from mbtrain.config import ModelConfig
from mbtrain.data.encoders import CategoricalEncoder, Encoders, NumericEncoder
from mbtrain.data.stream import row_groups, split_row_groups
from mbtrain.distributed import Cluster
from mbtrain.models.scoring import ModelSpec
from tests import distributed_steps
from tests.helpers import make_bag_frame, make_frame, run_cli
from tests.test_task_types import rated

SETTINGS = ["--tasks", "purchase,click", "--patience", "0", "--threads", "1", "--seed", "3", "--hidden", "8",
            "--experts", "2", "--tower", "4", "--device", "cpu"]
STREAMED = ["--memory-budget", "1K", "--exclude", "row_id"]  # a budget nothing fits in: the streamed path


def launch(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "mbtrain", "fit", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def torchrun(*args: str) -> None:
    result = launch(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def two_ranks_and_one(args: list[str], batch: int, tmp_path: Path) -> tuple[dict, dict, Result]:
    """The same fit on 2 torchrun ranks at `batch` (tmp_path/two) and in one process at twice it (tmp_path/one,
    checked to succeed): their last.pt, and the one process's CLI result."""
    torchrun(*args, "--batch-size", str(batch), "--out", str(tmp_path / "two"))
    result = run_cli("fit", *args, "--batch-size", str(2 * batch), "--out", str(tmp_path / "one"))
    assert result.exit_code == 0, result.output
    return weights(tmp_path / "two"), weights(tmp_path / "one"), result


def assert_same_weights(ours: dict, theirs: dict) -> None:
    for name, tensor in theirs["model"].items():
        torch.testing.assert_close(ours["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "train.parquet"
    make_frame(500, seed=0).write_parquet(path)  # 450 training rows: the last global batch is uneven
    return path


@pytest.fixture(scope="module")
def batch_groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 row groups of 32 rows; seed 3 holds 2 out, and rank 0 reads 7 of the other 13, rank 1 reads 6."""
    path = tmp_path_factory.mktemp("sharded") / "train.parquet"
    make_frame(15 * 32, seed=2).write_parquet(path, row_group_size=32)
    train, _ = split_row_groups(row_groups([path]), 0.1, seed=3)
    assert len(train) == 13 and {p.rows for p in train} == {32}
    return path


# The fit loop's sharding of the data and its epoch-end and after-step calls (every balancer at each level:
# test_every_balancer_at_each_level_takes_one_processs_steps_on_two_ranks). MetaBalance gathers the ranks'
# embedding rows; at batch 8 the one process also works on the batch's rows (the table's ~70 rows outnumber
# them), at 32 on the whole table
# --embed-dim 5 with batch 32: the last global batch (2 of 450 rows) leaves rank 1 no rows, and a row's gradient
# of 5 floats is not a multiple of 8 bytes (the gathered bytes of a 0- or 1-row slice, viewed back)
@pytest.mark.parametrize(("balance", "batch", "table_optimizer", "dim"),
                         [("none", 32, "adam", 8), ("metabalance", 32, "adam", 8), ("metabalance", 8, "adam", 8),
                          ("none", 32, "lazy-adam", 5), ("metabalance", 8, "rowwise-adagrad", 8)])
def test_two_ranks_match_one_process_with_twice_the_batch(balance: str, batch: int, table_optimizer: str, dim: int,
                                                          data: Path, tmp_path: Path) -> None:
    settings = [*SETTINGS, "--balance", balance, "--epochs", "2", "--table-optimizer", table_optimizer,
                "--embed-dim", str(dim)]
    two, one, _ = two_ranks_and_one([str(data), *settings], batch, tmp_path)
    assert_same_weights(two, one)
    if balance == "metabalance":
        torch.testing.assert_close(two["balancer"]["moving_norms"], one["balancer"]["moving_norms"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote nothing of its own


@pytest.mark.parametrize("model", [["--model", "mmoe", "--funnel"]])
def test_two_ranks_match_one_process_on_the_new_models(model: list[str], data: Path, tmp_path: Path) -> None:
    """The funnel's heads (back-propagated twice, row by row: heads_backward) under torchrun, through the fit loop,
    with MetaBalance (every model's split, every balancer:
    test_every_balancer_at_each_level_takes_one_processs_steps_on_two_ranks)."""
    settings = [*(a if a != "purchase,click" else "click,purchase" for a in SETTINGS), "--main-task", "purchase",
                *model, "--balance", "metabalance", "--epochs", "2"]
    two, one, _ = two_ranks_and_one([str(data), *settings], 16, tmp_path)
    assert_same_weights(two, one)
    torch.testing.assert_close(two["balancer"]["moving_norms"], one["balancer"]["moving_norms"])


def test_two_ranks_match_one_process_with_bags(tmp_path: Path) -> None:
    """Bags under torchrun, where the last global batch leaves rank 1 an empty slice (540 rows, 2 × 64)."""
    data = tmp_path / "bags.parquet"
    make_bag_frame(600, seed=3).write_parquet(data)
    settings = [*SETTINGS, "--balance", "metabalance", "--epochs", "2", "--max-bag", "6"]
    two, one, _ = two_ranks_and_one([str(data), *settings], 64, tmp_path)
    assert_same_weights(two, one)


def test_two_ranks_match_one_process_with_every_task_type(tmp_path: Path) -> None:
    """A regression main task, a multiclass one, labels missing for some rows and row weights: each task's loss is
    normalised over the global batch's weighted rows with its label, so 2 ranks still take one process's step."""
    data = tmp_path / "mixed.parquet"
    rated(600, seed=8).write_parquet(data)
    settings = ["--tasks", "watch,click,like,rating", "--task-type", "rating=multiclass", "--missing-labels", "skip",
                "--weight-column", "weight", *SETTINGS[2:], "--balance", "metabalance", "--epochs", "2"]
    two, one, _ = two_ranks_and_one([str(data), *settings], 32, tmp_path)
    assert_same_weights(two, one)
    torch.testing.assert_close(two["balancer"]["moving_norms"], one["balancer"]["moving_norms"])


def test_a_distributed_run_resumes(data: Path, tmp_path: Path) -> None:
    """Resumed on 2 ranks, it ends where one process at twice the batch does (which 2 ranks straight equal)."""
    common = [*SETTINGS, "--balance", "metabalance"]
    result = run_cli("fit", str(data), *common, "--batch-size", "64", "--epochs", "2", "--out",
                     str(tmp_path / "straight"))
    assert result.exit_code == 0, result.output
    torchrun(str(data), *common, "--batch-size", "32", "--epochs", "1", "--out", str(tmp_path / "split"))
    torchrun("--resume", "--out", str(tmp_path / "split"), "--epochs", "2")
    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert split["epoch"] == 2
    assert_same_weights(split, straight)


def test_streamed_ranks_reading_their_own_row_groups_match_one_process_with_twice_the_batch(
        batch_groups: Path, tmp_path: Path) -> None:
    """Unshuffled, rank r reads training row groups r, r+2, …, so global batch s is groups 2s and 2s+1: the
    batch one process with twice the batch reads. 13 groups: rank 1's shard runs out one step early."""
    common = [str(batch_groups), *SETTINGS, *STREAMED, "--balance", "metabalance", "--epochs", "2",
              "--no-shuffle"]
    two, one, result = two_ranks_and_one(common, 32, tmp_path)
    assert "streamed" in result.stdout
    assert_same_weights(two, one)
    torch.testing.assert_close(two["balancer"]["moving_norms"], one["balancer"]["moving_norms"])
    assert two["streamed"] and one["streamed"]
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "one" / "history.jsonl").read_text().splitlines()]
    for ours, theirs in zip(history, expected, strict=True):  # rank 0's validation, on all held-out rows
        for task, metrics in theirs["valid"].items():
            assert ours["valid"][task] == pytest.approx(metrics, rel=1e-5)
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)


def test_a_failure_on_rank_0_while_it_fits_the_encoders_stops_every_rank(batch_groups: Path,
                                                                         tmp_path: Path) -> None:
    """Only rank 0 reads the rows to infer the roles; the others get its error instead of waiting for it."""
    settings = [a if a != "purchase,click" else "purchase,clicks" for a in SETTINGS]
    result = launch(str(batch_groups), *settings, *STREAMED, "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("mbtrain: error: ")}
    assert len(errors) == 1 and "column 'clicks' (from --tasks) not found" in errors.pop(), result.stderr
    assert "gloo" not in result.stderr  # rank 1 raised rank 0's error, not a broken connection's


@pytest.mark.parametrize("model", ["mmoe", "shared-bottom", "ple", "esmm"])
@pytest.mark.parametrize("balance", BALANCERS)
def test_an_empty_local_batch_adds_zero_gradients(model: str, balance: str) -> None:
    """What a rank whose shard is exhausted computes: zero losses, zero gradients, no NaN in MetaBalance."""
    encoders = Encoders([CategoricalEncoder("user", "str", ["a", "b"]), CategoricalEncoder("device", "str", ["x"])],
                        [NumericEncoder("price", 1.0, 2.0, False)])
    spec = ModelSpec(["purchase", "click"], encoders,
                     {**vars(ModelConfig()), "model": model, "hidden": [8], "experts": 2, "tower": [4]})
    network = spec.build()
    setup = Setup(network.shared_parameters(), network.task_parameters(), 2,  # no other rank:
                  reduce=lambda tensors: None, gather=lambda tensors: [[t] for t in tensors])
    balancer = build_balancer(balance, setup)
    categorical, numeric = torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 1)
    split = network.split_forward(categorical, numeric) if balancer.wants_split else None
    logits = split.logits if split is not None else network(categorical, numeric)
    losses = F.binary_cross_entropy_with_logits(logits, torch.empty(0, 2), reduction="none").sum(dim=0) / 64
    balancer.backward(list(losses.unbind()), split)
    assert torch.equal(losses, torch.zeros(2))
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None and not parameter.grad.any(), name
    if balance in ("metabalance", "multibalance"):
        assert torch.isfinite(balancer.state_dict()["moving_norms"]).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in balancer.parameters())


def test_a_data_error_in_one_ranks_shard_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    """Rank 1 alone reads row group 1; its bad label must not leave rank 0 waiting in a collective."""
    frame = make_frame(4 * 32, seed=5)
    make_frame(64, seed=6).write_parquet(tmp_path / "valid.parquet")
    data = tmp_path / "train.parquet"
    frame.write_parquet(data, row_group_size=32)
    common = [*SETTINGS, *STREAMED, "--valid", str(tmp_path / "valid.parquet"), "--out", str(tmp_path / "run")]
    torchrun(str(data), *common, "--epochs", "1")
    labels = frame["purchase"].to_list()
    labels[40] = 2  # row group 1: rank 1's shard; resuming skips the up-front pass over the labels
    frame.with_columns(pl.Series("purchase", labels)).write_parquet(data, row_group_size=32)
    result = launch("--resume", "--out", str(tmp_path / "run"), "--epochs", "2")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("mbtrain: error: ")]
    assert len(errors) == 2, result.stderr
    assert any("label column 'purchase' is not binary" in line for line in errors)
    assert any("another rank stopped on a data error" in line for line in errors)
    assert "gloo" not in result.stderr and "RuntimeError" not in result.stderr


def test_every_balancer_at_each_level_takes_one_processs_steps_on_two_ranks(tmp_path: Path) -> None:
    """tests/distributed_steps.py under torchrun (2 gloo ranks, each half of every batch) against the same steps
    in this process on the whole batches, the per-task backward passes one by one: the weights and every
    balancer's state agree, --task-backward batched and every table optimizer included."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.distributed_steps", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    one = Cluster(0, 1, torch.device("cpu"))
    for case in distributed_steps.cases():
        two = torch.load(tmp_path / f"{distributed_steps.name_of(case)}.pt", weights_only=True)
        ours = distributed_steps.train((*case[:4], "loop", case[5]), one)
        # Adam divides each entry's step by its gradient's size: an entry whose gradient is at float32's rounding
        # level steps by a rounding-sized fraction of the rate, a little above SGD's tolerance
        atol = 1e-6 if case[5] == "sgd" else 1e-5
        for name, tensor in ours["model"].items():
            torch.testing.assert_close(two["model"][name], tensor, rtol=1e-5, atol=atol,
                                       msg=f"{distributed_steps.name_of(case)}: {name}")
        assert_same_state(two["balancer"], ours["balancer"], distributed_steps.name_of(case))


def assert_same_state(two: object, one: object, case: str) -> None:
    if isinstance(one, dict):
        assert isinstance(two, dict) and two.keys() == one.keys(), case
        for key in one:
            assert_same_state(two[key], one[key], f"{case}: {key}")
    elif isinstance(one, list | tuple):
        assert len(two) == len(one), case
        for at, (theirs, ours) in enumerate(zip(two, one, strict=True)):
            assert_same_state(theirs, ours, f"{case}[{at}]")
    elif isinstance(one, torch.Tensor):
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5, msg=case)
    else:
        assert two == one, case


def _workers(agent: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun's agent `agent` started (its children with a RANK)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent:
                env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
                found[int(env["RANK"])] = int(proc.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_rank_killed_mid_epoch_under_max_restarts_ends_as_the_uninterrupted_run(tmp_path: Path) -> None:
    """kill -9 of rank 1 once a checkpoint inside the second epoch is written: torchrun starts the group again with
    the same command, which resumes the run from it by itself and ends with the straight run's weights, losses and
    metrics, to the bit. Dropout, and a last global batch of 6 rows (rank 1 gets none), leave the ranks' RNG
    streams apart by then; DWA weighs epoch 2's losses by epoch 1's, summed over both ranks."""
    data = tmp_path / "train.parquet"
    make_frame(1500, seed=4).write_parquet(data)  # 1,350 training rows: 96 global batches of 14, then 6 rows
    common = [str(data), *SETTINGS, "--balance", "dwa", "--epochs", "3", "--dropout", "0.3", "--batch-size", "7",
              "--exclude", "row_id"]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "-m", "mbtrain", "fit", *common, "--checkpoint-every", "5", "--out", str(out)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as agent:
        killed = None
        deadline = time.monotonic() + 90
        while killed is None and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
            except (OSError, RuntimeError, EOFError, KeyError):
                continue
            workers = _workers(agent.pid)
            if checkpoint["epoch"] == 1 and checkpoint["position"] is not None and 1 in workers:
                os.kill(workers[1], signal.SIGKILL)
                killed = checkpoint["position"]["step"]
        stdout, stderr = agent.communicate(timeout=120)
    assert killed is not None, "the run ended before a checkpoint inside epoch 2: make it longer"
    assert agent.returncode == 0, stdout + stderr
    assert "torchrun restarted this fit: resuming" in stdout
    # the straight run checkpoints by the clock (a duration shorter than any step: rank 0 reads its clock every
    # 20 steps and tells the other rank), which changes no step
    straight = launch(*common, "--checkpoint-every", "0.000001s", "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert straight.stdout.count("checkpoint: epoch ") == 3 * 4  # after steps 20, 40, 60 and 80 of 97, each epoch
    ours, theirs = weights(out), weights(tmp_path / "straight")
    for name, tensor in theirs["model"].items():
        torch.testing.assert_close(ours["model"][name], tensor, rtol=0, atol=0, msg=name)
    history = [[json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
               for run in (out, tmp_path / "straight")]
    assert [(row["train_loss"], row["valid"]) for row in history[0]] == \
        [(row["train_loss"], row["valid"]) for row in history[1]]


def test_a_distributed_streamed_run_resumes_inside_an_epoch(batch_groups: Path, tmp_path: Path) -> None:
    """Streamed, each rank rebuilds its own shard's shuffle buffer at the checkpoint's step: 2 ranks stopped by
    --patience inside the first epoch and resumed there, through the second, end where 2 ranks straight do."""
    common = [str(batch_groups), *SETTINGS[:2], *SETTINGS[4:], *STREAMED, "--balance", "metabalance", "--epochs",
              "2", "--batch-size", "16", "--validate-every", "1"]
    torchrun(*common, "--patience", "1", "--out", str(tmp_path / "split"))
    stopped = weights(tmp_path / "split")
    assert stopped["streamed"] and stopped["epoch"] == 0 and stopped["position"] is not None
    torchrun("--resume", "--out", str(tmp_path / "split"), "--patience", "0")
    torchrun(*common, "--patience", "0", "--out", str(tmp_path / "straight"))
    resumed = weights(tmp_path / "split")
    assert resumed["epoch"] == 2
    assert_same_weights(resumed, weights(tmp_path / "straight"))
