"""--checkpoint-every and --validate-every: last.pt written inside an epoch, from which --resume takes the very steps
the uninterrupted run takes (in memory and streamed, with a balancer that keeps state); validation, best.pt and
--patience on a step schedule, which changes nothing of the steps."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

import mbtrain.train
from mbtrain.balance import BALANCERS
from mbtrain.compare import seconds_per_epoch
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


def same_weights(ours: Path, theirs: Path) -> None:
    """The two runs ended (no place inside an epoch) with the very same weights."""
    one, two = (torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in (ours, theirs))
    assert one["position"] is None and two["position"] is None
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=0, atol=0, msg=name)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("streamed", "balance", "validate"),
                         [(False, "famo", False), (True, "famo", False), (False, "metabalance", False),
                          (True, "metabalance", True), (False, "metabalance", True)])
def test_a_mid_epoch_checkpoint_resumes_to_the_uninterrupted_run(streamed: bool, balance: str, validate: bool,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    data = tmp_path / "train.parquet"
    make_frame(400, seed=5).write_parquet(data, row_group_size=40)
    settings = [*SETTINGS, "--balance", balance, *(["--memory-budget", "1K"] if streamed else []),
                *(["--validate-every", "2"] if validate else [])]
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
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    same_weights(tmp_path / "straight", tmp_path / "split")
    for ours, theirs in zip(rows(tmp_path / "straight"), rows(tmp_path / "split"), strict=True):
        assert ours["step"] == theirs["step"] and ours.get("progress") == theirs.get("progress")
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6) and ours["valid"] == theirs["valid"]
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["tasks"] == \
        json.loads((tmp_path / "straight" / "metrics.json").read_text())["tasks"]


def test_validating_inside_the_epoch_changes_no_step_and_picks_the_best_validation(tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(400, seed=5).write_parquet(data)
    common = [str(data), *SETTINGS[:-4], "--exclude", "row_id", "--balance", "metabalance"]  # no --checkpoint-every
    plain = run_cli("fit", *common, "--out", str(tmp_path / "plain"))
    assert plain.exit_code == 0, plain.output
    stepped = run_cli("fit", *common, "--validate-every", "4", "--out", str(tmp_path / "stepped"))
    assert stepped.exit_code == 0, stepped.output
    same_weights(tmp_path / "plain", tmp_path / "stepped")
    history = rows(tmp_path / "stepped")
    steps = rows(tmp_path / "plain")[0]["step"]  # per epoch: 360 training rows at batch 32
    assert steps == 12
    assert [row["step"] for row in history] == [4, 8, 12, 16, 20, 24]
    assert [row.get("progress") for row in history] == [0.3333, 0.6667, None] * 2
    assert [row["epoch"] for row in history] == [1, 1, 1, 2, 2, 2]
    assert history[2]["valid"] == rows(tmp_path / "plain")[0]["valid"]  # the epochs' ends are as without
    metrics = json.loads((tmp_path / "stepped" / "metrics.json").read_text())
    best = max(history, key=lambda row: row["valid"]["purchase"]["auc"])
    assert metrics["best_step"] == best["step"] and metrics["tasks"] == best["valid"]
    assert "at 33% (step 4)" in stepped.stdout
    best_pt = torch.load(tmp_path / "stepped" / "checkpoints" / "best.pt", weights_only=True)
    assert best_pt["best"]["step"] == best["step"]
    assert (best_pt["epoch"] + 1, best_pt["position"]["step"]) == (best["epoch"], best["step"] % steps) \
        if "progress" in best else best_pt["position"] is None


def test_patience_counts_validations_and_stops_inside_the_one_pass(tmp_path: Path) -> None:
    """Random labels: the validation AUC soon stops gaining, and with --patience 2 the pass ends there; the run
    resumed with more patience carries on from that step to the uninterrupted run's weights."""
    data = tmp_path / "train.parquet"
    frame = make_frame(800, seed=1)
    noise = torch.Generator().manual_seed(0)
    frame = frame.with_columns(purchase=pl.Series((torch.rand(800, generator=noise) < 0.3).int().tolist()))
    frame.write_parquet(data)
    common = [str(data), *SETTINGS[:-4], "--exclude", "row_id", "--epochs", "1", "--validate-every", "2"]
    stopped = run_cli("fit", *common, "--patience", "2", "--out", str(tmp_path / "stopped"))
    assert stopped.exit_code == 0, stopped.output
    metrics = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    history = rows(tmp_path / "stopped")
    assert metrics["stopped_early"] and "stopped early in epoch 1" in stopped.stdout
    assert history[-1]["progress"] < 1 and len(history) >= 3
    assert sum(not row["best"] for row in history[-2:]) == 2
    assert metrics["epochs_run"] == 1
    before = (tmp_path / "stopped" / "metrics.json").read_bytes()
    again = run_cli("fit", "--resume", "--out", str(tmp_path / "stopped"))  # patience still spent: nothing to do
    assert again.exit_code == 0 and "stopped early in epoch 1" in again.stdout
    assert (tmp_path / "stopped" / "metrics.json").read_bytes() == before
    resumed = run_cli("fit", "--resume", "--out", str(tmp_path / "stopped"), "--patience", "0")
    assert resumed.exit_code == 0, resumed.output
    straight = run_cli("fit", *common, "--patience", "0", "--out", str(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    same_weights(tmp_path / "straight", tmp_path / "stopped")
    assert [row["valid"] for row in rows(tmp_path / "stopped")] == [row["valid"] for row in rows(tmp_path / "straight")]


def test_a_duration_interval_checkpoints_by_the_clock(tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(200).write_parquet(data)
    common = [str(data), "--tasks", "purchase,click", "--epochs", "1", "--batch-size", "32", "--exclude", "row_id"]
    often = run_cli("fit", *common, "--checkpoint-every", "0.000001s", "--out", str(tmp_path / "often"))
    assert often.exit_code == 0, often.output
    assert often.stdout.count("checkpoint: epoch 1, step ") == 5  # every step but the epoch's last (6 steps)
    rarely = run_cli("fit", *common, "--checkpoint-every", "2h", "--out", str(tmp_path / "rarely"))
    assert rarely.exit_code == 0, rarely.output
    assert "checkpoint:" not in rarely.stdout


@pytest.mark.parametrize("value", ["0", "ten", "-3", "15x", "0s", "m", "1.5"])
def test_a_bad_interval_is_one_line(value: str, tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(100).write_parquet(data)
    result = run_cli("fit", str(data), "--tasks", "purchase,click", "--checkpoint-every", value, "--out",
                     str(tmp_path / "run"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--checkpoint-every" in result.stderr
    assert not (tmp_path / "run").exists()


def test_validate_every_must_be_at_least_one(tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(100).write_parquet(data)
    result = run_cli("fit", str(data), "--tasks", "purchase,click", "--validate-every", "0", "--out",
                     str(tmp_path / "run"))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--validate-every" in result.stderr


def test_compare_times_an_epoch_over_rows_inside_epochs(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(row) + "\n" for row in [
        {"epoch": 1, "step": 4, "progress": 0.5, "seconds": 2.0}, {"epoch": 1, "step": 8, "seconds": 2.5},
        {"epoch": 2, "step": 12, "progress": 0.5, "seconds": 3.5}]))
    assert seconds_per_epoch(history) == pytest.approx(8.0 / 1.5)


def as_torchrun(monkeypatch: pytest.MonkeyPatch, job: str, restart: int) -> None:
    """The environment torchrun gives attempt `restart` of job `job` (one rank)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_fit_torchrun_restarts_continues_its_own_run(overwrite: bool, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command line, started again by torchrun (--max-restarts) after a failure, resumes the run its job
    was writing (with --overwrite: the staging directory, swapped in at the end) and ends as the straight run."""
    data = tmp_path / "train.parquet"
    make_frame(400, seed=5).write_parquet(data)
    out = tmp_path / "run"
    fit = ["fit", str(data), *SETTINGS, "--balance", "metabalance"]
    command = [*fit, "--out", str(out), *(["--overwrite"] if overwrite else [])]
    straight = run_cli(*fit, "--out", str(tmp_path / "straight"))
    assert straight.exit_code == 0, straight.output
    if overwrite:  # an older run the new one replaces once it ends
        assert run_cli("fit", str(data), "--tasks", "purchase,click", "--epochs", "1", "--out", str(out)).exit_code == 0
    with monkeypatch.context() as patch:
        as_torchrun(patch, "job1", 0)
        interrupt_at(patch, epoch=2, step=3)
        assert run_cli(*command).exit_code == 130
    with monkeypatch.context() as patch:
        as_torchrun(patch, "job1", 1)
        restarted = run_cli(*command)
    assert restarted.exit_code == 0, restarted.output
    resumed = tmp_path / (".run.partial" if overwrite else "run")
    assert f"resuming {resumed} from its last checkpoint" in restarted.stdout
    same_weights(tmp_path / "straight", out)
    assert not (tmp_path / ".run.partial").exists()
    assert [row["step"] for row in rows(out)] == [row["step"] for row in rows(tmp_path / "straight")]


def test_a_restart_before_the_first_checkpoint_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "train.parquet"
    make_frame(400, seed=5).write_parquet(data)
    command = ["fit", str(data), *SETTINGS[:-4], "--exclude", "row_id"]
    assert run_cli(*command, "--out", str(tmp_path / "straight")).exit_code == 0
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"torchrun_job": "job1"}))  # the first attempt's
    with monkeypatch.context() as patch:
        as_torchrun(patch, "job1", 1)
        restarted = run_cli(*command, "--out", str(tmp_path / "run"))
    assert restarted.exit_code == 0, restarted.output
    assert "before its first checkpoint: starting" in restarted.stdout
    same_weights(tmp_path / "straight", tmp_path / "run")
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)  # killed before any file: an empty run directory
    assert run_cli(*command, "--out", str(tmp_path / "bare")).exit_code == 0
    same_weights(tmp_path / "straight", tmp_path / "bare")


def test_a_restart_leaves_another_jobs_run_or_other_settings_alone(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "train.parquet"
    make_frame(200).write_parquet(data)
    command = ["fit", str(data), "--tasks", "purchase,click", "--epochs", "1", "--out", str(tmp_path / "run")]
    with monkeypatch.context() as patch:
        as_torchrun(patch, "job1", 0)
        assert run_cli(*command).exit_code == 0
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    with monkeypatch.context() as patch:
        as_torchrun(patch, "job2", 1)  # another job's run: the error it always was
        other = run_cli(*command)
        as_torchrun(patch, "job1", 1)  # this job's run, but other settings
        changed = run_cli(*command, "--lr", "0.5")
    with monkeypatch.context() as patch:
        as_torchrun(patch, "none", 1)  # torchrun's static rendezvous names every job "none": no id to go by
        nameless = run_cli(*command)
    assert nameless.exit_code == 2 and nameless.stderr.count("\n") == 1
    assert "--standalone or --rdzv-id" in nameless.stderr
    assert other.exit_code == 2 and "already exists" in other.stderr
    assert changed.exit_code == 2 and changed.stderr.count("\n") == 1 and "--lr" in changed.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("balance", [name for name in BALANCERS if name not in ("none", "famo", "metabalance")])
def test_every_balancer_resumes_inside_an_epoch_to_the_uninterrupted_run(balance: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The balancer's state in the middle of an epoch (step counters, moving averages, generators, the last
    losses) comes back with it (FAMO and MetaBalance: the test above)."""
    data = tmp_path / "train.parquet"
    make_frame(200, seed=5).write_parquet(data)
    settings = ["--tasks", "purchase,click", "--epochs", "2", "--batch-size", "32", "--threads", "1", "--patience",
                "0", "--hidden", "8", "--tower", "4", "--checkpoint-every", "2", "--exclude", "row_id",
                "--balance", balance]
    assert run_cli("fit", str(data), *settings, "--out", str(tmp_path / "straight")).exit_code == 0
    with monkeypatch.context() as patch:
        interrupt_at(patch, epoch=2, step=2)
        assert run_cli("fit", str(data), *settings, "--out", str(tmp_path / "split")).exit_code == 130
    resumed = run_cli("fit", "--resume", "--out", str(tmp_path / "split"))
    assert resumed.exit_code == 0, resumed.output
    same_weights(tmp_path / "straight", tmp_path / "split")


def test_the_intervals_are_toml_keys(tmp_path: Path) -> None:
    data = tmp_path / "train.parquet"
    make_frame(200).write_parquet(data)
    config = tmp_path / "run.toml"
    config.write_text('tasks = "purchase,click"\nepochs = 1\nbatch_size = 32\ncheckpoint_every = 2\n'
                      'validate_every = 3\nexclude = "row_id"\n')
    result = run_cli("fit", str(data), "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("checkpoint: epoch 1, step") == 3  # after steps 2, 3 (a validation) and 4 of 6
    assert [row["step"] for row in rows(tmp_path / "run")] == [3, 6]


def test_a_resumed_row_counts_the_seconds_before_its_checkpoint(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "train.parquet"
    make_frame(400, seed=5).write_parquet(data)
    settings = [*SETTINGS, "--balance", "famo"]
    with monkeypatch.context() as patch:
        interrupt_at(patch, epoch=2, step=6)
        assert run_cli("fit", str(data), *settings, "--out", str(tmp_path / "split")).exit_code == 130
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["position"]["row_seconds"] > 0
    checkpoint["position"]["row_seconds"] = 1000.0  # as if the row had run that long before the interruption
    torch.save(checkpoint, last)
    stale = last.with_name(".last.pt.tmp4242")  # a write a killed process never finished
    stale.write_bytes(b"half")
    resumed = run_cli("fit", "--resume", "--out", str(tmp_path / "split"))
    assert resumed.exit_code == 0, resumed.output
    assert 1000.0 <= rows(tmp_path / "split")[-1]["seconds"] < 1060.0
    assert not stale.exists()
