"""The fit recipe, read top to bottom: set up (the run directory, the data, the model, its balancer and optimizer,
a resumed run's state), train (epoch after epoch: the steps, validation, the history row, early stopping, a
checkpoint), finish (metrics.json, the run directory swapped in, the summary).

Everything it needs comes from a RunConfig; everything it produces lands in the run directory:
config.json, checkpoints/{last,best}.pt (checkpoint.Checkpoint), history.jsonl, metrics.json.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from mbtrain import __version__
from mbtrain.allocator import keep_freed_memory
from mbtrain.balance import Balancer, Setup, build_balancer
from mbtrain.balance.per_task import LOOP, PARAMETERS
from mbtrain.checkpoint import RESUME, Checkpoint, copy_atomic, drop_temporaries, write_json, write_jsonl
from mbtrain.config import Every, RunConfig, peak_lr
from mbtrain.data.batches import EncodedData, Rows
from mbtrain.data.encoders import table_slices
from mbtrain.data.feed import DeviceFeed
from mbtrain.data.prepare import Prepared, prepare
from mbtrain.distributed import Cluster, any_rank, cluster_from_env, every_rank, from_main, main_says
from mbtrain.elastic import JOB_KEY, Continuation, continuation, staging_dir, torchrun_job
from mbtrain.errors import MbtrainError, first_line
from mbtrain.models.scoring import ModelSpec, Predictions, ScoringModel, score_rows
from mbtrain.optim import TrainOptimizer
from mbtrain.report import history_line, metrics_table, model_text, table_text
from mbtrain.tasks import TaskSet, higher_is_better
from mbtrain.tensorboard_log import LOG_EVERY, RunLog, require_tensorboard

SAMPLE_ROWS = 256  # validation rows kept in checkpoints so that export can check itself on real data
PROGRESS_EVERY = 20  # steps between loss read-outs in the progress bar
CLOCK_EVERY = 20  # steps between rank 0's readings of its clock for a --checkpoint-every duration, on several ranks
SPARSE_LABELS = 10  # labelled rows a global batch may expect of a task below which fit warns (with a balancer)


def fit(config: RunConfig, data_path: Path, out: Path, *, overwrite: bool = False, resume: bool = False,
        console: Console | None = None, on_validation: OnValidation | None = None) -> dict[str, Any]:
    """Train into `out` and return the metrics.json content (validation metrics of the best validation).

    Without `resume`, a run its own torchrun job left in `out` (a restart, elastic.py) is resumed or started over.
    `on_validation` hears each validation's history row and main-task score (--monitor's, higher is better) and,
    returning True, stops the run there as --patience would (a sweep's pruner; one process only).
    A KeyboardInterrupt comes back with a message saying where the last checkpoint is."""
    config.validate()
    if config.train.tensorboard:
        require_tensorboard()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    cluster = cluster_from_env(config.train.device)
    console = console or Console()
    try:
        going_on = Continuation(True, False, False) if resume else \
            from_main(lambda: continuation(out, overwrite, config, data_path))  # rank 0's view, before it writes
        if going_on.note and cluster.is_main:
            console.print(going_on.note, highlight=False, soft_wrap=True)
        recipe = FitRecipe(config, data_path, out, cluster, console, on_validation)
        recipe.setup(going_on.overwrite, going_on.resume, going_on.staged)
        recipe.train()
        metrics = recipe.finish()
    except BaseException:
        cluster.close(wait=False)  # the other ranks may be blocked in a collective: do not wait for them
        raise
    cluster.close()
    return metrics


class FitRecipe:
    """One fit: `setup`, `train`, `finish`, in that order. Only the main rank writes files and prints."""

    def __init__(self, config: RunConfig, data_path: Path, out: Path, cluster: Cluster, console: Console,
                 on_validation: OnValidation | None = None) -> None:
        self.config, self.data_path, self.out, self.cluster = config, data_path, out, cluster
        self.on_validation = on_validation
        self.stopped = False  # on_validation asked to stop
        self.main = cluster.is_main
        self.console = console if self.main else Console(quiet=True)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"epoch", "step", "score", "metrics"} of the best validation so far
        self.bad_epochs = 0  # validations since the best one (epochs, without --validate-every)
        self.epoch = 0  # the last finished epoch (while training: the one under way)
        self.position: Position | None = None  # a resumed mid-epoch checkpoint's place in epoch self.epoch + 1
        self.cut_short = False  # stopped inside an epoch (--validate-every)
        self.trained = False  # whether this fit took a step (a resumed run may have none left to take)
        self.row_started = 0.0  # when the time of the next history row began (the epoch's start, or the last row)
        self.seconds = 0.0

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, overwrite: bool, resume: bool, staged: bool = False) -> None:
        """The data, model, balancer and optimizer; a resumed run's state; the staging directory."""
        if self.out.exists() and not self.out.is_dir():
            raise MbtrainError(f"--out {self.out}: is a file, not a run directory")
        if not resume and self.out.exists() and _holds_files(self.out) and not overwrite:
            raise MbtrainError(f"--out {self.out} already exists: pass --overwrite to replace it or --resume to "
                               "continue it")
        self.staging = staged or (not resume and self.out.exists())  # an old run is replaced once this one ends
        self.work = staging_dir(self.out) if self.staging else self.out
        last = self.work / "checkpoints" / "last.pt"
        resumed = Checkpoint.load(last, needs=RESUME) if resume else None
        if resumed is not None and self.cluster.world_size > 1:
            self._check_ranks_agree(resumed, last)
        self.cluster.barrier()  # every rank has looked at --out before the main rank creates anything
        spec = resumed.model_spec(last) if resumed else None
        self.data = prepare(self.config, self.data_path, spec.encoders if spec else None,
                            streamed=resumed.streamed if resumed else None, tasks=spec.task_set if spec else None)
        self.steps = self.data.train.steps(self.config.train.batch_size, self.cluster.world_size)  # per epoch
        self.spec = spec or ModelSpec(self.config.ordered_tasks, self.data.encoders,
                                      dataclasses.asdict(self.config.model), self.config.funnel_tasks,
                                      self.data.tasks.to_dict())
        self.tasks = self.data.tasks
        self.monitor = self.config.train.monitor or self.tasks.tasks[0].monitor
        self.tasks.check_monitor(self.monitor)
        self._warn()
        if self.main:
            if self.staging and self.work.exists() and not resume:
                shutil.rmtree(self.work)
            (self.work / "checkpoints").mkdir(parents=True, exist_ok=True)
            for folder in (self.work, self.work / "checkpoints"):
                drop_temporaries(folder)
            # first of this attempt's files: a torchrun restart finds its job's run by it (elastic.py)
            write_json(_config_record(self.config, self.data_path, self.data), self.work / "config.json")
        self._build(fresh=resumed is None)
        self.feed = DeviceFeed(self.data.train, self.cluster.device)  # once: resident rows last every epoch
        if resumed is not None:
            self._restore(resumed, last)

    def _warn(self) -> None:
        if not self.main:
            return
        warnings = self.config.balance.warnings()
        if self.cluster.world_size > 1 and self.config.model.norm == "batch":
            warnings.append(f"--norm batch under torchrun normalises each rank's share of the batch: "
                            f"{self.cluster.world_size} ranks no longer take one process's step (--norm layer does)")
        warnings += self._sparse_label_warnings()
        rates = self.data.valid.label_sums().mean().tolist()
        for task, kind, rate in zip(self.spec.tasks, self.tasks.types, rates, strict=True):
            if kind == "binary" and rate in (0.0, 1.0):  # the main rank validates
                warnings.append(f"{self.data.valid_source}: task {task!r} has a single class in validation; its "
                                "AUC will be null")
        for warning in warnings:
            sys.stderr.write(f"mbtrain: warning: {warning}\n")

    def _sparse_label_warnings(self) -> list[str]:
        """A task labelled on so few rows that many global batches hold none of them: those batches take the plain
        sum (train_steps), so the balancer sees only part of the epoch."""
        sums, config = self.data.sums, self.config
        if sums is None or config.balance.balance == "none" or config.data.missing_labels != "skip":
            return []
        batch = config.train.batch_size * self.cluster.world_size
        share = (sums.rows / max(1, len(self.data.train))).tolist()
        return [f"task {task!r} has a label on {rate:.1%} of the training rows, about {rate * batch:.1f} a global "
                f"batch of {batch:,}: a batch without one takes the plain sum of the other tasks, not --balance "
                f"{config.balance.balance}; a bigger --batch-size avoids that" for task, rate in
                zip(self.spec.tasks, share, strict=True)
                if rate * batch < SPARSE_LABELS]

    def _build(self, fresh: bool) -> None:
        config = self.config
        torch.manual_seed(config.train.seed)
        self.model: ScoringModel = self.spec.build()
        if fresh:  # a resumed model's biases come from its checkpoint
            self.model.set_base_logits(self.tasks.base_logits(self.data.sums))
        self.model.to(self.cluster.device)
        setup = Setup.of(self.model, len(self.spec.tasks), config.train.seed, self.cluster,
                         config.balance.balance_level, config.train.task_backward)
        self.balancer = build_balancer(config.balance.balance, setup, config.balance.chosen())
        self.optimizer = build_optimizer(self.model.parameters(), config, self.balancer.parameters(),
                                         self.cluster.world_size)

    def _restore(self, resumed: Checkpoint, path: Path) -> None:
        try:
            self.model.load_state_dict(resumed.model)
            self.optimizer.load_state_dict(resumed.optimizer)
            self.balancer.load_state_dict(resumed.balancer)
            rngs = resumed.rank_rngs
            own = rngs[self.cluster.rank] if rngs and len(rngs) == self.cluster.world_size else \
                {"cpu": resumed.rng, "cuda": resumed.cuda_rng}  # rank 0's, on another number of ranks
            torch.set_rng_state(own["cpu"])
            if self.cluster.device.type == "cuda" and own.get("cuda") is not None:
                torch.cuda.set_rng_state(own["cuda"], self.cluster.device)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise MbtrainError(f"{path}: cannot resume from it ({type(exc).__name__}: {first_line(exc)})") from None
        self.best, self.bad_epochs, self.epoch = resumed.best, resumed.bad_epochs, resumed.epoch
        self.position = Position.from_dict(resumed.position, self.cluster.device) if resumed.position else None
        ranks = self.position.loss_sum.shape[0] if self.position else self.cluster.world_size
        if ranks != self.cluster.world_size:
            raise MbtrainError(f"{path}: written inside an epoch by {ranks} process(es): resume it on {ranks} (the "
                               "epoch's batches are cut for that many; a checkpoint at an epoch's end resumes on any "
                               "number)")
        done = self._steps_done()
        self.history = [row for row in _read_history(self.work / "history.jsonl")
                        if row.get("step", row["epoch"] * self.steps) <= done]  # older rows have no step
        if self.main and self.best is not None and self.best.get("step", self.best["epoch"] * self.steps) == done:
            copy_atomic(path, self.work / "checkpoints" / "best.pt")  # an interruption may have beaten best.pt

    def _check_ranks_agree(self, resumed: Checkpoint, path: Path) -> None:
        """Every rank read the checkpoint rank 0 read (a rank that read it while the file was being replaced
        would otherwise take other steps), or every rank stops with one line."""
        place = (resumed.epoch, (resumed.position or {}).get("step"))
        if any_rank(from_main(lambda: place) != place):
            raise MbtrainError(f"{path}: the ranks read different checkpoints (it changed while they read it); "
                               "run again")

    def _steps_done(self) -> int:
        """Steps of the run taken so far: the finished epochs' and the epoch under way's (a resumed position's)."""
        return self.epoch * self.steps + (self.position.step if self.position else 0)

    # ------------------------------------------------------------------------------------------------ train

    def train(self) -> None:
        """Epochs until --epochs or until --patience validations bring no gain; a checkpoint after each epoch,
        and inside one with --checkpoint-every or --validate-every."""
        config, console = self.config, self.console
        log = RunLog(self.work / "tensorboard", self.spec.tasks, steps_done=self._steps_done()) \
            if self.main and config.train.tensorboard else None
        console.print(self._first_line(), soft_wrap=True)
        sample = _sample(self.data.valid) if self.main else None
        keep_freed_memory()  # from here on every step allocates and frees the same tensors
        started = time.perf_counter()
        try:
            with _progress(console) as progress:
                bar = Bar.over_run(progress, self.steps, config.train.epochs, self._steps_done(),
                                   config.train.batch_size * self.cluster.world_size)
                clock = CheckpointClock(config.train.checkpoint_every, self.cluster)
                while self.epoch < config.train.epochs and not self._stopping():
                    self.trained = True
                    self.epoch += 1
                    self.row_started = time.perf_counter() - (self.position.row_seconds if self.position else 0.0)
                    entry = train_epoch(self.model, self.optimizer, self.balancer, self.data.train, self.data.valid,
                                        self.tasks, config, self.epoch, bar, self.cluster, log, feed=self.feed,
                                        start=self.position, on_step=self._mid_epoch(sample, clock, log))
                    self.position = None
                    if entry is None:  # stopped at a validation inside the epoch (--patience, on_validation)
                        self.cut_short = True
                        break
                    self._keep(entry, sample, clock)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(_interrupted(self.out, self.work, self.staging)) from None
        finally:
            if log is not None:
                log.close()
        self.seconds = time.perf_counter() - started

    def _first_line(self) -> str:
        data, spec, cluster = self.data, self.spec, self.cluster
        ranks = f", {cluster.world_size} ranks" if cluster.world_size > 1 else ""
        return (f"[bold]mbtrain fit[/] {self.data_path}: {len(data.train):,} training rows, {len(data.valid):,} "
                f"validation rows; {model_text(spec.model, spec.funnel)}, balance {self.config.balance.described}; "
                f"tasks {', '.join(spec.tasks)} (main {spec.main_task}); data {data.storage}; {cluster.device}"
                f"{ranks}; run {self.out}")

    def _stopping(self) -> bool:
        """--patience has run out, or on_validation asked to stop."""
        patience = self.config.train.patience
        return self.stopped or bool(patience and self.bad_epochs >= patience)

    def _record(self, entry: dict[str, Any]) -> float:
        """A validation's history row (the time since the last row), marked best where the main task's --monitor
        metric gained; returns that score (higher is better)."""
        now = time.perf_counter()
        entry["seconds"], self.row_started = round(now - self.row_started, 4), now
        score = monitor_score(entry["valid"][self.spec.main_task], self.monitor)
        entry["best"] = self.best is None or score > self.best["score"]
        if entry["best"]:
            self.best = {"epoch": self.epoch, "step": entry["step"], "score": score, "metrics": entry["valid"]}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.history.append(entry)
        return score

    def _mid_epoch(self, sample: dict[str, torch.Tensor] | None, clock: CheckpointClock, log: RunLog | None
                   ) -> OnStep | None:
        """With --validate-every or --checkpoint-every: what every rank calls after each step inside the epoch,
        given the place in it and the epoch's training so far; True once --patience has run out (the epoch stops).
        Each rank takes the same decisions at the same steps: validation and a checkpoint are collectives."""
        validate_every = self.config.train.validate_every
        if validate_every is None and not clock.on:
            return None

        def after(position: Position, trained: Callable[[], Trained]) -> bool:
            if validate_every and position.step % validate_every == 0:
                entry = history_row(self.epoch, self.tasks.names, trained(), self._validation(), self.config,
                                    self.balancer, self._steps_done_at(position), position.step / self.steps)
                if log is not None:
                    log.validation(entry["step"], entry)
                self._keep(entry, sample, clock, position)
                return self._stopping()
            if clock.due(position.step):
                self._save_checkpoint(False, sample, position)
                clock.restart()
            return False
        return after

    def _keep(self, entry: dict[str, Any], sample: dict[str, torch.Tensor] | None, clock: CheckpointClock,
              position: Position | None = None) -> None:
        """After a validation, at an epoch's end or inside it (`position`): its history row, a checkpoint, its
        line."""
        score = self._record(entry)
        self._save_checkpoint(entry["best"], sample, position)
        clock.restart()
        self.console.print(history_line(entry, self.spec.main_task, self.monitor), soft_wrap=True)
        if self.on_validation is not None and self.on_validation(entry, score):
            self.stopped = True

    def _validation(self) -> dict[str, dict[str, Any]]:
        """Every task's validation metrics, from rank 0 to all (scoring leaves the model in training mode)."""
        return from_main(lambda: validate(self.model, self.data.valid, self.tasks, self.config.funnel_tasks))

    def _steps_done_at(self, position: Position) -> int:
        """The run's steps at `position` of the epoch under way."""
        return (self.epoch - 1) * self.steps + position.step

    def _save_checkpoint(self, best: bool, sample: dict[str, torch.Tensor] | None,
                         position: Position | None = None) -> None:
        """History first (resume drops lines past last.pt), best.pt last (never ahead of last.pt). Every rank calls
        it (each rank's RNG state is gathered, and mid-epoch each rank's losses so far); rank 0 writes. Mid-epoch
        (`position`), as of the last finished epoch and the steps taken since, with a line saying so."""
        if position is not None:
            position = position.gathered(time.perf_counter() - self.row_started)
        cuda = self.cluster.device.type == "cuda"
        rngs = every_rank({"cpu": torch.get_rng_state(),
                           **({"cuda": torch.cuda.get_rng_state(self.cluster.device)} if cuda else {})})
        if not self.main:
            return
        written = time.perf_counter()
        checkpoint = Checkpoint(
            config=self.config.to_dict(), spec=self.spec.to_dict(), model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), balancer=self.balancer.state_dict(),
            epoch=self.epoch - (position is not None), best=self.best, bad_epochs=self.bad_epochs,
            streamed=self.data.train.streamed, rng=rngs[0]["cpu"], sample=sample, cuda_rng=rngs[0].get("cuda"),
            position=None if position is None else position.to_dict(),
            rank_rngs=rngs if self.cluster.world_size > 1 else None,
        )
        write_jsonl(self.history, self.work / "history.jsonl")
        checkpoint.save(self.work / "checkpoints" / "last.pt")
        if best:
            copy_atomic(self.work / "checkpoints" / "last.pt", self.work / "checkpoints" / "best.pt")
        if position is not None:
            self.console.print(f"checkpoint: epoch {self.epoch}, step {position.step:,}/{self.steps:,} in "
                               f"{self.work / 'checkpoints' / 'last.pt'} ({time.perf_counter() - written:.2f}s)",
                               soft_wrap=True, highlight=False)

    # ----------------------------------------------------------------------------------------------- finish

    def finish(self) -> dict[str, Any]:
        """metrics.json (the best epoch's validation metrics), the run directory swapped in, the summary."""
        config, spec, data, best = self.config, self.spec, self.data, self.best
        epoch = self.epoch + (self.position is not None)  # a resumed run stopped inside an epoch: that epoch too
        stopped_early = self._stopping() and (epoch < config.train.epochs or self.cut_short
                                                    or self.position is not None)
        metrics = {
            "main_task": spec.main_task,
            "tasks": best["metrics"],
            "best_epoch": best["epoch"],
            "best_step": best.get("step"),
            "monitor": self.monitor,
            "epochs_run": epoch,
            "stopped_early": stopped_early,
            "evaluated_on": data.valid_source,
            "train_rows": len(data.train),
            "valid_rows": len(data.valid),
            "model": spec.model["model"],
            "balance": config.balance.balance,
            "seconds": round(self.seconds, 3),
        }
        if self.main:
            if self.trained or not (self.work / "metrics.json").is_file():  # a finished run resumed keeps its own
                write_json(metrics, self.work / "metrics.json")
            if self.staging:
                _swap(self.work, self.out)
        note = f"stopped early in epoch {epoch}; " if stopped_early else ""
        at_step = f" (step {best['step']:,})" if config.train.validate_every and best.get("step") else ""
        weights = config.balance.task_weights
        weighted = f" · task weights {_weights_text(weights)}" if weights else ""
        self.console.print(metrics_table(
            metrics, f"validation metrics, best epoch {best['epoch']}{at_step} of {epoch}",
            f"{note}{model_text(spec.model, spec.funnel)} · balance {config.balance.described}{weighted} · "
            f"{len(data.train):,} train / {len(data.valid):,} valid rows · run saved in {self.out}",
        ))
        self.console.print(table_text(table_slices(spec.encoders), spec.model["embed_dim"],
                                      config.train.table_optimizer), soft_wrap=True)
        return metrics


def build_optimizer(params: Iterable[torch.Tensor], config: RunConfig, balancer_params: Iterable[torch.Tensor] = (),
                    world_size: int = 1) -> TrainOptimizer:
    """Fused Adam over the dense parameters (one kernel over every parameter instead of ~10 ops per tensor: its
    cost in docs/benchmarks.md) beside --table-optimizer over the embedding table (optim.py). train_steps sets
    the rates before every step: --table-lr, where given, in place of the peak rate."""
    settings = config.train
    peak = peak_lr(settings, world_size)
    return TrainOptimizer(params, settings.table_optimizer, peak, settings.weight_decay,
                          settings.table_lr / peak if settings.table_lr else 1.0, balancer_params)


def learning_rate(config: RunConfig, steps_per_epoch: int, step: int, world_size: int = 1) -> float:
    """The learning rate of global step `step` (from 0): linear warm-up over --warmup epochs, then the peak
    rate (config.peak_lr) held (constant) or decayed along a half cosine to 0 at the end of --epochs (cosine).
    A function of the step alone, so a resumed run needs no scheduler state; resumed with more --epochs, the
    rest of the decay stretches over them."""
    settings = config.train
    peak = peak_lr(settings, world_size)
    warmup = max(1, round(settings.warmup * steps_per_epoch)) if settings.warmup else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    if settings.schedule == "constant":
        return peak
    total = max(settings.epochs * steps_per_epoch, warmup + 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def validate(model: ScoringModel, valid: Rows, tasks: TaskSet, funnel: list[str] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Every metric of every task on the validation rows (each task's type's)."""
    predictions, labels, groups = score_rows(Predictions(model, tasks), valid)
    return tasks.metrics(predictions, labels, groups, funnel)


def _sample(valid: Rows) -> dict[str, torch.Tensor]:
    """A few real validation rows, kept in checkpoints for export's self-check."""
    chunk = next(valid.chunks())
    return {"categorical": chunk.categorical[:SAMPLE_ROWS].clone(), "numeric": chunk.numeric[:SAMPLE_ROWS].clone()}


def _agreed(batches: Iterator[tuple[EncodedData, int]], cluster: Cluster) -> Iterator[tuple[EncodedData, int]]:
    """The batches, every rank learning each step whether some rank could not read its own: a data error in
    one rank's shard then stops every rank with one line, instead of leaving the others waiting in a
    collective. (All ranks take the same number of steps, so they run out together.)"""
    if cluster.world_size == 1:
        yield from batches
        return
    while True:
        failure = None
        try:
            item = next(batches)
        except StopIteration:
            return
        except MbtrainError as exc:
            failure = exc
        if any_rank(failure is not None):
            raise failure or MbtrainError("another rank stopped on a data error (its line says which); stopping too")
        yield item


class _Waited:
    """The feed's batches, timing how long each takes to come (history's data_share): the wait for the data
    alone, not _agreed's exchange with the other ranks."""

    def __init__(self, batches: Iterator[tuple[EncodedData, int]]) -> None:
        self.batches, self.seconds = batches, 0.0

    def __iter__(self) -> _Waited:
        return self

    def __next__(self) -> tuple[EncodedData, int]:
        asked = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - asked


def train_epoch(model: ScoringModel, optimizer: TrainOptimizer, balancer: Balancer, train: Rows,
                valid: Rows, tasks: TaskSet, config: RunConfig, epoch: int, bar: Bar,
                cluster: Cluster | None = None, log: RunLog | None = None, feed: DeviceFeed | None = None,
                start: Position | None = None, on_step: OnStep | None = None) -> dict[str, Any] | None:
    """One epoch: the training steps, then validation; returns the history.jsonl entry, or None where `on_step`
    stopped the epoch. Rank 0 alone validates (the exact AUC needs every row's prediction in one place) and hands
    the metrics to the others, which early stopping needs. `feed` (the fit's, for `train`) brings the batches to
    the device; without one, this call makes its own. `start` and `on_step`: train_steps'."""
    cluster = cluster or Cluster(0, 1, torch.device("cpu"))
    started = time.perf_counter()
    trained = train_steps(model, optimizer, balancer, train, tasks, config, epoch, bar, cluster, log, feed,
                          start, on_step)
    if trained is None:
        return None
    valid_metrics = from_main(lambda: validate(model, valid, tasks, config.funnel_tasks))
    entry = history_row(epoch, tasks.names, trained, valid_metrics, config, balancer, epoch * trained.steps)
    entry["seconds"] = round(time.perf_counter() - started, 4)
    if log is not None:
        log.validation(entry["step"], entry)
    return entry


@dataclass
class Position:
    """Where an epoch's training stands after `step` steps: what a mid-epoch checkpoint keeps so that the rest of
    the epoch, resumed, takes the very steps and gives the very history row of the uninterrupted run."""

    step: int
    loss_sum: torch.Tensor  # [T] the epoch's summed weighted losses so far, this rank's (a checkpoint's: [ranks, T])
    rows_sum: torch.Tensor  # [T] the rows (weight) with a label they are over (likewise)
    ratio_sum: torch.Tensor  # [T] the balancer's grad_norm_ratio summed over the balanced steps (alike on all ranks)
    balanced: int  # steps the balancer took
    row_seconds: float = 0.0  # a checkpoint's: seconds of the history row under way (a resumed row counts them)

    def gathered(self, row_seconds: float) -> Position:
        """A copy whose sums are every rank's own, [ranks, T] (a collective): what a checkpoint keeps, for each rank
        to resume its own with, so that the resumed sums add up in the uninterrupted run's order."""
        sums = every_rank(torch.stack([self.loss_sum, self.rows_sum]).cpu())
        stacked = torch.stack(sums).to(self.loss_sum.device)
        return dataclasses.replace(self, loss_sum=stacked[:, 0], rows_sum=stacked[:, 1], row_seconds=row_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], device: torch.device) -> Position:
        return cls(**{key: value.to(device) if isinstance(value, torch.Tensor) else value
                      for key, value in raw.items()})


@dataclass
class Trained:
    """What an epoch's training steps (or those so far) leave for its history row."""

    mean_losses: torch.Tensor  # [T] over the epoch's training rows that have each task's label (every rank's)
    mean_ratios: torch.Tensor | None  # [T] the balancer's grad_norm_ratio averaged over the steps
    lr: float  # the last step's learning rate
    steps: int
    rows_per_second: float
    data_share: float  # of the training seconds, spent waiting for the next batch


OnStep = Callable[[Position, Callable[[], Trained]], bool]  # FitRecipe._mid_epoch's: True stops the epoch
OnValidation = Callable[[dict[str, Any], float], bool]  # fit's: each history row and its score; True stops the run


@dataclass
class Bar:
    """The progress bar over the whole run, every epoch's steps: rows a second and the time left to the end."""

    progress: Progress
    task: TaskID
    steps: int  # per epoch

    @classmethod
    def over_run(cls, progress: Progress, steps: int, epochs: int, done: int, rows_per_step: int) -> Bar:
        return cls(progress, progress.add_task("", total=steps * epochs, completed=done, loss="",
                                               rows_per_step=rows_per_step), steps)

    def show(self, epoch: int, epochs: int, step: int, loss: torch.Tensor) -> None:
        self.progress.update(self.task, completed=(epoch - 1) * self.steps + step,
                             description=f"epoch {epoch}/{epochs}", loss=f"loss {float(loss):.4f}")


class CheckpointClock:
    """--checkpoint-every, in steps or rank 0's seconds. Every rank must take a mid-epoch checkpoint at the same
    step (its losses so far and RNG state are gathered), so on several ranks rank 0 reads its clock every
    CLOCK_EVERY steps and says what it read."""

    def __init__(self, every: str | None, cluster: Cluster) -> None:
        self.every = Every.parse(every) if every is not None else None
        self.cluster = cluster
        self.restart()

    @property
    def on(self) -> bool:
        return self.every is not None

    def restart(self) -> None:
        self.since = time.perf_counter()

    def due(self, step: int) -> bool:
        """Whether a checkpoint falls after the epoch's `step`-th step."""
        if self.every is None:
            return False
        if self.every.steps is not None:
            return step % self.every.steps == 0
        if self.cluster.world_size > 1 and step % CLOCK_EVERY:
            return False
        return main_says(time.perf_counter() - self.since >= self.every.seconds)


def train_steps(model: ScoringModel, optimizer: TrainOptimizer, balancer: Balancer, train: Rows, tasks: TaskSet,
                config: RunConfig, epoch: int, bar: Bar, cluster: Cluster,
                log: RunLog | None = None, feed: DeviceFeed | None = None, start: Position | None = None,
                on_step: OnStep | None = None) -> Trained | None:
    """One pass over the training rows (shuffled unless --no-shuffle), its batches from `feed` (a DeviceFeed of
    `train`; made here without one).

    Under torchrun each rank takes its slice of every global batch of world_size × batch_size rows (in memory)
    or its own shard's batches (streamed), and its losses are divided by the global batch's rows (with missing
    labels or weights, by each task's rows or weight there): summed across ranks, that is one process's mean.

    `start` (a mid-epoch checkpoint's) skips the batches the epoch already took, drawn again in the same seeded
    order (in memory: cut and dropped; streamed: read and dropped, the shuffle buffer rebuilt as it was), and
    carries on its sums (each rank its own). `on_step` is called after every step but the last with the
    position and a way to read the training so far (mid-epoch checkpoints and validation); when it says stop,
    the pass ends there and returns None.

    A global batch that holds no label of some task (--missing-labels skip; or whose rows of it all weigh 0) takes
    the plain sum of the others' losses (one host sync a step, to choose): a balancer would take that task's zero
    loss and gradient for a solved task (FAMO's weights of the others collapse, GradNorm's first loss stays 0,
    MGDA's minimum-norm point is the zero gradient), so it sees only the batches where every task has a label."""
    device = cluster.device
    started = time.perf_counter()
    batch_size = config.train.batch_size
    steps = train.steps(batch_size, cluster.world_size)
    lr = learning_rate(config, steps, (epoch - 1) * steps, cluster.world_size)
    generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + epoch) if config.train.shuffle else None
    loss_sum = torch.zeros(len(config.ordered_tasks), device=device)
    rows_sum = torch.zeros_like(loss_sum)  # what the epoch's losses are means over: rows (or weight) with a label
    ratio_sum = torch.zeros_like(loss_sum)
    balanced = 0  # steps the balancer took (the others: a task had no label in the global batch)
    done = 0  # steps taken before `start`'s checkpoint
    if start is not None:
        done, balanced, ratio_sum = start.step, start.balanced, start.ratio_sum.clone()
        loss_sum, rows_sum = start.loss_sum[cluster.rank].clone(), start.rows_sum[cluster.rank].clone()
    counted = config.data.missing_labels == "skip" or config.data.weight_column is not None
    plain = None if config.balance.balance == "none" or not counted else build_balancer(
        "none", Setup.of(model, len(tasks.names), config.train.seed, cluster, PARAMETERS, LOOP))
    weights = torch.tensor(config.weight_vector, device=device)  # --task-weights, applied before any balancer
    model.train()
    feed = feed if feed is not None else DeviceFeed(train, device)
    waited = _Waited(feed.batches(batch_size, generator, cluster.rank, cluster.world_size))
    batches: Iterator[tuple[EncodedData, int]] = itertools.islice(waited, done, None)
    if train.streamed:  # reads (and can fail) as it goes; data in memory cannot
        batches = _agreed(batches, cluster)
    rows_taken = 0  # global rows trained on in this call
    aside = 0.0  # seconds on_step took (validation, checkpoints): not training time

    def so_far() -> Trained:
        """The epoch's training up to here (a collective: its losses summed over ranks)."""
        seconds = max(time.perf_counter() - started - aside, 1e-9)
        sums = [loss_sum.clone(), rows_sum.clone()]
        cluster.sum_(sums)
        ratios = ratio_sum / balanced if balancer.grad_norm_ratio is not None and balanced else None
        return Trained(sums[0] / sums[1].clamp(min=1e-12), ratios, lr, steps, rows_taken / seconds,
                       waited.seconds / seconds)

    for step, (batch, global_rows) in enumerate(batches, start=done + 1):
        categorical, numeric = batch.categorical, batch.numeric
        local, denominators = _denominators(batch, global_rows, len(tasks.names), counted, cluster)
        stepper = plain if plain is not None and bool((denominators == 0).any()) else balancer  # same on every rank
        split = model.split_forward(categorical, numeric) if stepper.wants_split else None
        logits = split.logits if split is not None else model(categorical, numeric)
        losses = _losses(model, tasks, logits, batch, denominators, global_rows)
        optimizer.zero_grad()
        stepper.backward(list((losses * weights).unbind()), split)
        global_step = (epoch - 1) * steps + step - 1
        lr = learning_rate(config, steps, global_step, cluster.world_size)
        optimizer.set_lr(lr)
        optimizer.step()
        if stepper.wants_losses_after_step:  # the same rows under the stepped parameters (FAMO)
            with torch.no_grad():
                after = _losses(model, tasks, model(categorical, numeric), batch, denominators, global_rows) * weights
            balancer.after_step(list(after.unbind()))
        if log is not None and global_step % LOG_EVERY == 0:
            balancing = stepper is balancer  # a plain step has no balancer's ratios or weights to show
            log.step(global_step + 1, losses.detach() * denominators / local.clamp(min=1e-12),
                     balancer.norm_ratios if balancing else None, balancer.task_weights if balancing else None,
                     balancer.ratio_names)
        loss_sum += losses.detach() * denominators
        rows_sum += local
        rows_taken += global_rows
        if stepper is balancer:
            balanced += 1
            if balancer.grad_norm_ratio is not None:
                ratio_sum += balancer.grad_norm_ratio
        if step % PROGRESS_EVERY == 0 or step == steps:
            bar.show(epoch, config.train.epochs, step, losses.detach().sum())
        if on_step is not None and step < steps:
            paused = time.perf_counter()
            stop = on_step(Position(step, loss_sum, rows_sum, ratio_sum, balanced), so_far)
            aside += time.perf_counter() - paused
            if stop:
                return None
    trained = so_far()
    balancer.epoch_end(trained.mean_losses)
    return trained


def history_row(epoch: int, tasks: list[str], trained: Trained, valid_metrics: dict[str, dict[str, Any]],
                config: RunConfig, balancer: Balancer, step: int, progress: float = 1.0) -> dict[str, Any]:
    """A validation's history.jsonl entry: after `step` steps of the run, `progress` of the way through `epoch`
    (written below 1 only: a validation inside the epoch, --validate-every); its training figures are the
    epoch's so far. The caller adds its seconds."""
    entry: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "train_loss": dict(zip(tasks, trained.mean_losses.tolist(), strict=True)),
        "valid": valid_metrics,
        "rows_per_second": round(trained.rows_per_second, 1),
        "data_share": round(trained.data_share, 4),
        "lr": trained.lr,
    }
    if progress < 1:
        entry["progress"] = round(progress, 4)
    if trained.mean_ratios is not None:
        entry["grad_norm_ratio"] = dict(zip(tasks, trained.mean_ratios.tolist(), strict=True))
    if config.balance.task_weights:
        entry["task_weights"] = dict(zip(tasks, config.weight_vector, strict=True))
    if balancer.task_weights is not None:  # the last step's
        entry["balance_weights"] = dict(zip(tasks, balancer.task_weights.tolist(), strict=True))
    return entry


def _weights_text(weights: dict[str, float]) -> str:
    return ",".join(f"{task}={weight:g}" for task, weight in weights.items())


def _denominators(batch: EncodedData, global_rows: int, tasks: int, counted: bool, cluster: Cluster
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """([T] this rank's, [T] the global batch's) rows with each task's label, weighed by --weight-column: what each
    task's loss is a mean over. Without missing labels or weights that is the global batch's rows, known without a
    collective; with them, one all-reduce of T numbers."""
    device = batch.labels.device
    if not counted:
        return (torch.full((tasks,), float(len(batch)), device=device),
                torch.full((tasks,), float(global_rows), device=device))
    present = (~torch.isnan(batch.labels)).to(batch.labels.dtype)
    local = (present if batch.weights is None else present * batch.weights[:, None]).sum(dim=0)
    total = local.clone()
    cluster.sum_([total])
    return local, total


def _losses(model: ScoringModel, tasks: TaskSet, logits: torch.Tensor, batch: EncodedData,
            denominators: torch.Tensor, global_rows: int) -> torch.Tensor:
    """[T] each task's loss (its type's, tasks/) summed over this rank's rows that have its label, each row weighed
    by --weight-column, divided by the global batch's rows with its label (`denominators`, weighed alike): summed
    across ranks, one process's (weighted) mean. The model's own terms for a task (AITM's calibrator, at the later
    stage: models/base.py's auxiliary_losses, summed over the rows) are divided by the global batch's rows. Added
    here, before --task-weights and the balancer, so that every balancer still sees T losses, the split forward's
    logits give the same terms, and the terms divide like the losses under torchrun."""
    rows = tasks.row_losses(logits, batch.labels)
    if batch.weights is not None:
        rows = rows * batch.weights[:, None]
    losses = rows.sum(dim=0) / denominators.clamp(min=1e-12)  # a task no row of the batch has a label for: 0
    extra = model.auxiliary_losses(logits)
    return losses if extra is None else losses + extra / global_rows


def monitor_score(main: dict[str, Any], monitor: str) -> float:
    """The best-epoch and early-stopping score, higher is better: the main task's --monitor metric (AUC and
    GAUC as they are, log loss and NE negated), or minus log loss where that metric is undefined (one class)."""
    value = main.get(monitor)
    if value is None:
        return -main["logloss"] if main.get("logloss") is not None else -math.inf
    return value if higher_is_better(monitor) else -value


class RowsPerSecond(ProgressColumn):
    """Rows a second over the last half minute of steps (rich's speed estimate, in steps, times the global batch)."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("" if speed is None else f"{speed * task.fields['rows_per_step']:,.0f} rows/s")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
        RowsPerSecond(), TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
        disable=not console.is_terminal,
    )


def _interrupted(out: Path, work: Path, staging: bool) -> str:
    if staging:
        return f"interrupted; {out} is unchanged, the unfinished run is in {work}"
    if (work / "checkpoints" / "last.pt").is_file():
        return f"interrupted; the last checkpoint is in {out}, continue with: mbtrain fit --resume --out {out}"
    return "interrupted before the first checkpoint; nothing to resume"


def _holds_files(folder: Path) -> bool:
    """Whether a run directory holds anything (a fit killed as it began may have left empty folders only)."""
    return any(path.is_file() for path in folder.rglob("*"))


def _config_record(config: RunConfig, data_path: Path, prepared: Prepared) -> dict[str, Any]:
    schema = prepared.schema
    valid = config.data.valid
    return {
        **config.to_dict(),
        "paths": {"data": str(data_path.resolve()), "valid": str(Path(valid).resolve()) if valid else None},
        "columns": {
            "tasks": schema.tasks,
            "categorical": schema.categorical,
            "numeric": schema.numeric,
            "vectors": schema.vectors,
            "task_types": dict(zip(prepared.tasks.names, prepared.tasks.types, strict=True)),
            "excluded": {c.name: c.reason for c in schema.columns if c.role == "excluded"},
        },
        "mbtrain_version": __version__,
        JOB_KEY: torchrun_job(),
    }


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _swap(staged: Path, out: Path) -> None:
    """Replace the old run directory with the finished one; the old one is only removed once swapped."""
    retired = out.parent / f".{out.name}.old"
    if retired.exists():
        shutil.rmtree(retired)
    out.rename(retired)
    staged.rename(out)
    shutil.rmtree(retired)
