"""The fit recipe: read and encode the data, train epoch by epoch, validate, checkpoint, stop early, resume.

Everything it needs comes from a RunConfig; everything it produces lands in the run directory:
config.json, checkpoints/{last,best}.pt, history.jsonl, metrics.json.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mbtrain import __version__
from mbtrain.allocator import keep_freed_memory
from mbtrain.balance import build_balancer
from mbtrain.checkpoint import load_checkpoint, save_checkpoint, write_json, write_jsonl
from mbtrain.config import RunConfig, peak_lr
from mbtrain.data.batches import EncodedData, Rows, split_rows
from mbtrain.data.coded import CodedFrame
from mbtrain.data.encoders import Encoders, capped_rows, count_tensor, element_counts
from mbtrain.data.io import read_coded
from mbtrain.data.schema import Schema, check_funnel, group_keys, infer_schema, label_tensor
from mbtrain.data.stream import (
    StreamingBatches,
    buffer_rows_for,
    fit_encoders_streaming,
    infer_schema_streaming,
    is_parquet,
    parquet_files,
    parse_memory_budget,
    read_files,
    row_groups,
    scan_row_groups,
    should_stream,
    split_row_groups,
    value_counts_streaming,
)
from mbtrain.distributed import Cluster, any_rank, cluster_from_env, from_main
from mbtrain.errors import MbtrainError, first_line
from mbtrain.metrics import task_metrics
from mbtrain.models.scoring import ModelSpec, Probabilities, score_rows
from mbtrain.report import history_line, metrics_table, model_text
from mbtrain.tensorboard_log import LOG_EVERY, RunLog, require_tensorboard

SAMPLE_ROWS = 256  # validation rows kept in checkpoints so that export can check itself on real data
PROGRESS_EVERY = 20  # steps between loss read-outs in the progress bar


@dataclass
class Prepared:
    schema: Schema
    spec: ModelSpec
    train: Rows
    valid: Rows
    valid_source: str
    path: str  # how the data is held, for the summary: "in memory" or "streamed, ..."


def prepare(config: RunConfig, data_path: Path, spec: ModelSpec | None = None,
            streamed: bool | None = None) -> Prepared:
    """Read, validate, split and encode; encoders are fitted on the training rows unless `spec` (a resumed
    run's) brings them. Validation is config.data.valid, else a seeded held-out share. Data whose in-memory
    path would exceed --memory-budget (a big Parquet file, directory or glob) is streamed instead."""
    files, budget, fits = _locate(config, data_path)
    if streamed is None:  # a resumed run keeps its path: the other one holds out different validation rows
        streamed = any_rank(not fits)  # one path for all ranks, even where machines' budgets differ
    if streamed:
        return _prepare_streaming(config, files, str(data_path), spec, budget)
    return _prepare_in_memory(config, _read_coded(files, _plain(config)), str(data_path), spec)


def _plain(config: RunConfig, validation: bool = False) -> list[str]:
    """Columns read as they are stored: the labels, and the --group-by column of the data validation comes from
    (the training file's only when it holds the validation rows)."""
    grouped = config.data.group_by and (validation or not config.data.valid)
    return config.ordered_tasks + ([config.data.group_by] if grouped else [])


@dataclass
class Description:
    """What `inspect` shows of the data, as `fit` would see it."""

    schema: Schema
    rows: int
    rates: torch.Tensor  # [T] positive rate per task
    broken: str | None  # with a funnel: what breaks it, where rows do
    capped: dict[str, tuple[int, int]]  # with --max-vocab: per categorical column and bag, (values dropped, their
    # rows; a bag's: its elements)


def describe(config: RunConfig, data_path: Path) -> Description:
    """The data as `fit` would see it (over all its rows), streamed where fit streams."""
    files, _, fits = _locate(config, data_path)
    tasks, d, funnel = config.ordered_tasks, config.data, config.funnel_tasks
    source = str(data_path)
    if not fits:
        parts = row_groups(files)
        schema = infer_schema_streaming(parts, source, tasks, d.categorical, d.numeric, d.exclude)
        labels: Any = StreamingBatches(parts, Encoders([], []), tasks, buffer_rows=1)
        rates, rows = labels.positive_rates(), sum(part.rows for part in parts)

        def counts(name: str) -> torch.Tensor:
            return value_counts_streaming(scan_row_groups(parts), name, d.max_bag if name in schema.bags else None)
    else:
        coded = _read_coded(files, tasks)
        schema = infer_schema(coded, source, tasks, d.categorical, d.numeric, d.exclude)
        labels = label_tensor(coded, source, tasks)
        rates, rows = labels.mean(dim=0), coded.height

        def counts(name: str) -> torch.Tensor:
            if name in schema.bags:
                return count_tensor(element_counts(coded.frame.get_column(name), d.max_bag, source)["count"])
            return coded.column(name, source).totals[:-1]
    broken = None
    try:
        if funnel is not None and not fits:
            labels.check_funnel(funnel, source)
        elif funnel is not None:
            check_funnel(labels, tasks, funnel, source)
    except MbtrainError as exc:
        broken = str(exc)
    capped = {} if d.max_vocab is None else {
        name: capped_rows(counts(name), d.min_frequency, d.max_vocab) for name in [*schema.categorical, *schema.bags]}
    return Description(schema, rows, rates, broken, capped)


def _locate(config: RunConfig, data_path: Path) -> tuple[list[Path], int, bool]:
    """(the data's files, the memory budget in bytes, whether the in-memory path fits in it)."""
    budget = parse_memory_budget(config.data.memory_budget)
    files = parquet_files(data_path)
    return files, budget, not should_stream(files, budget)


def _read_coded(files: list[Path], tasks: list[str]) -> CodedFrame:
    """The in-memory path's table: Parquet text features left dictionary-encoded (the labels are parsed as
    they are); several files are first checked to be Parquet with the same columns."""
    if len(files) > 1:
        row_groups(files)  # one clear line for a non-Parquet file, mismatched columns or no rows at all
    return read_coded(files, plain=tasks)


def _new_spec(config: RunConfig, encoders: Encoders) -> ModelSpec:
    return ModelSpec(config.ordered_tasks, encoders, dict(vars(config.model)), config.funnel_tasks)


def _prepare_in_memory(config: RunConfig, frame: CodedFrame, source: str, spec: ModelSpec | None) -> Prepared:
    """Roles, encoders and the encoded tensors all from each column's codes, made once (data/coded.py)."""
    valid_path = Path(config.data.valid) if config.data.valid else None
    tasks = config.ordered_tasks
    d = config.data
    schema = infer_schema(frame, source, tasks, d.categorical, d.numeric, d.exclude)
    labels = label_tensor(frame, source, tasks)
    check_funnel(labels, tasks, config.funnel_tasks, source)
    if valid_path is not None:
        valid_frame = _read_coded(parquet_files(valid_path), _plain(config, validation=True))
        valid_source = str(valid_path)
        valid_labels = label_tensor(valid_frame, valid_source, tasks)  # bad labels fail before any fitting
        check_funnel(valid_labels, tasks, config.funnel_tasks, valid_source)
        valid_groups = group_keys(valid_frame, valid_source, d.group_by) if d.group_by else None
        if spec is None:
            spec = _new_spec(config, Encoders.fit(frame, schema.categorical, schema.numeric, d.min_frequency,
                                                  source=source, max_vocab=d.max_vocab, bags=schema.bags,
                                                  max_bag=d.max_bag))
        train = EncodedData(*spec.encoders.encode(frame, source), labels)
        valid = EncodedData(*spec.encoders.encode(valid_frame, valid_source), valid_labels, groups=valid_groups)
    else:
        if frame.height < 2:
            raise MbtrainError(f"{source}: needs at least 2 rows to hold out a validation split")
        groups = group_keys(frame, source, d.group_by) if d.group_by else None
        train_rows, valid_rows = split_rows(frame.height, d.valid_fraction, config.train.seed)
        valid_source = f"{source} (held-out {d.valid_fraction:.0%})"
        if spec is None:  # fitted on the training rows only, without copying them out of the frame
            encoders = Encoders.fit(frame, schema.categorical, schema.numeric, d.min_frequency, rows=train_rows,
                                    source=source, max_vocab=d.max_vocab, bags=schema.bags, max_bag=d.max_bag)
            spec = _new_spec(config, encoders)
        everything = EncodedData(*spec.encoders.encode(frame, source), labels, groups=groups)
        train = EncodedData(everything.categorical, everything.numeric, labels, rows=train_rows)
        valid = everything.take(valid_rows)
    return Prepared(schema, spec, train, valid, valid_source, "in memory")


def _prepare_streaming(config: RunConfig, files: list[Path], source: str, spec: ModelSpec | None,
                       budget: int) -> Prepared:
    """Roles and encoders from streaming passes, batches read row group by row group (data/stream.py).

    The row groups of the split come from the footers, on every rank; the passes over the rows (roles, and
    encoders unless `spec` brings them) run on rank 0 alone under torchrun, which hands them to the others."""
    tasks = config.ordered_tasks
    d = config.data
    parts = row_groups(files)
    valid_files = parquet_files(Path(d.valid)) if d.valid else []
    if d.valid:
        train_parts, valid_source = parts, d.valid
        valid_parts = row_groups(valid_files) if is_parquet(valid_files[0]) else []
        if not valid_parts and len(valid_files) > 1:
            raise MbtrainError(f"--valid {d.valid}: matches several non-Parquet files; give one CSV file")
    else:
        train_parts, valid_parts = split_row_groups(parts, d.valid_fraction, config.train.seed)
        valid_source = f"{source} (held-out row groups, {sum(p.rows for p in valid_parts):,} rows)"

    def roles_and_encoders() -> tuple[Schema, Encoders]:
        schema = infer_schema_streaming(parts, source, tasks, d.categorical, d.numeric, d.exclude)
        validation_file = valid_files[0] if d.valid else parts[0].path  # one footer read for both checks
        present = set(pq.read_schema(validation_file).names) if is_parquet(validation_file) else None
        if d.group_by and present is not None and d.group_by not in present:
            raise MbtrainError(f"{validation_file}: --group-by column {d.group_by!r} not found")
        if d.valid and valid_parts:  # a Parquet --valid file
            missing = [c for c in schema.columns if c.role != "excluded" and c.name not in present]
            if missing:
                raise MbtrainError(f"{valid_files[0]}: lacks column {missing[0].name!r} that the training data has")
        if spec is not None:
            return schema, spec.encoders
        return schema, fit_encoders_streaming(scan_row_groups(train_parts), schema.categorical, schema.numeric,
                                              d.min_frequency, d.max_vocab, schema.bags, d.max_bag)

    schema, encoders = from_main(roles_and_encoders)
    spec = spec or _new_spec(config, encoders)
    buffer = buffer_rows_for(budget, spec.encoders, tasks)
    train = StreamingBatches(train_parts, spec.encoders, tasks, buffer)
    if valid_parts:
        valid: Rows = StreamingBatches(valid_parts, spec.encoders, tasks, buffer, d.group_by)
    else:  # a CSV validation file: read whole, as CSV does not stream
        frame = read_files(valid_files)
        valid = EncodedData(*spec.encoders.encode(frame, d.valid), label_tensor(frame, d.valid, tasks),
                            groups=group_keys(frame, d.valid, d.group_by) if d.group_by else None)
    funnel = config.funnel_tasks
    if funnel is not None:  # one pass over the label columns (held-out row groups included), on rank 0
        def check() -> None:
            StreamingBatches(parts, spec.encoders, tasks, buffer).check_funnel(funnel, source)
            if d.valid and valid_parts:
                valid.check_funnel(funnel, d.valid)
            elif d.valid:
                check_funnel(valid.labels, tasks, funnel, d.valid)

        from_main(check)
    return Prepared(schema, spec, train, valid, valid_source, f"streamed, shuffle buffer {buffer:,} rows")


def build_optimizer(params: Iterable[torch.Tensor], config: RunConfig, balancer_params: Iterable[torch.Tensor] = ()
                    ) -> torch.optim.Optimizer:
    """Adam, fused: one kernel over every parameter instead of ~10 ops per tensor (CPU, MMoE with a 36k-row
    table: 0.19 vs 1.7 ms a step; the plain step took 7.4 ms). train_epoch sets the rate before every step.
    A balancer's own parameters (log-variances, task weights) get no weight decay: it would pull them to 0."""
    groups: list[dict[str, Any]] = [{"params": list(params)}]
    extra = list(balancer_params)
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=peak_lr(config.train), weight_decay=config.train.weight_decay,
                            fused=True)


def learning_rate(config: RunConfig, steps_per_epoch: int, step: int, world_size: int = 1) -> float:
    """The learning rate of global step `step` (from 0): linear warm-up over --warmup epochs, then the peak
    rate (config.peak_lr) held (constant) or decayed along a half cosine to 0 at the end of --epochs (cosine).
    A function of the step alone, so a resumed run needs no scheduler state; resumed with more --epochs, the
    rest of the decay stretches over them."""
    t = config.train
    peak = peak_lr(t, world_size)
    warmup = max(1, round(t.warmup * steps_per_epoch)) if t.warmup else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    if t.schedule == "constant":
        return peak
    total = max(t.epochs * steps_per_epoch, warmup + 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def validate(model: torch.nn.Module, valid: Rows, tasks: list[str], funnel: list[str] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Every metric of every task on the validation rows (metrics.py)."""
    probabilities, labels, groups = score_rows(Probabilities(model), valid)
    return task_metrics(probabilities, labels, tasks, groups, funnel)


def _sample(valid: Rows) -> dict[str, torch.Tensor]:
    """A few real validation rows, kept in checkpoints for export's self-check."""
    chunk = next(valid.chunks())
    return {"categorical": chunk.categorical[:SAMPLE_ROWS].clone(), "numeric": chunk.numeric[:SAMPLE_ROWS].clone()}


def fit(config: RunConfig, data_path: Path, out: Path, *, overwrite: bool = False, resume: bool = False,
        console: Console | None = None) -> dict[str, Any]:
    """Train into `out` and return the metrics.json content (validation metrics of the best epoch).

    A KeyboardInterrupt comes back with a message saying where the finished epochs are."""
    config.validate()
    if config.train.tensorboard:
        require_tensorboard()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    cluster = cluster_from_env(config.train.device)
    try:
        metrics = _fit(config, data_path, out, overwrite, resume, console or Console(), cluster)
    except BaseException:
        cluster.close(wait=False)  # the other ranks may be blocked in a collective: do not wait for them
        raise
    cluster.close()
    return metrics


def _fit(config: RunConfig, data_path: Path, out: Path, overwrite: bool, resume: bool, console: Console,
         cluster: Cluster) -> dict[str, Any]:
    main = cluster.is_main  # the one rank that writes files and prints
    if not main:
        console = Console(quiet=True)
    state = load_checkpoint(out / "checkpoints" / "last.pt") if resume else None
    if not resume and out.exists() and any(out.iterdir()) and not overwrite:
        raise MbtrainError(f"--out {out} already exists: pass --overwrite to replace it or --resume to continue it")
    staging = not resume and out.exists()
    cluster.barrier()  # every rank has looked at --out before the main rank creates anything
    prepared = prepare(config, data_path, spec_of(state, out / "checkpoints" / "last.pt") if state else None,
                       streamed=state.get("streamed") if state else None)
    spec, train, valid = prepared.spec, prepared.train, prepared.valid
    if main and config.balance.task_weights and config.balance.balance == "famo":
        sys.stderr.write("mbtrain: warning: --task-weights has no effect under --balance famo, which weighs each "
                         "task's log-loss (a constant factor on a loss cancels)\n")
    if main and cluster.world_size > 1 and config.model.norm == "batch":
        sys.stderr.write("mbtrain: warning: --norm batch under torchrun normalises each rank's share of the batch: "
                         f"{cluster.world_size} ranks no longer take one process's step (--norm layer does)\n")
    if main:  # the one rank that validates
        for task, rate in zip(spec.tasks, valid.positive_rates().tolist(), strict=True):
            if rate in (0.0, 1.0):
                sys.stderr.write(f"mbtrain: warning: {prepared.valid_source}: task {task!r} has a single class "
                                 "in validation; its AUC will be null\n")
    work = out.parent / f".{out.name}.partial" if staging else out
    if main:
        if staging and work.exists():
            shutil.rmtree(work)
        (work / "checkpoints").mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.train.seed)
    model = spec.build()
    if state is None:  # a resumed model's biases come from its checkpoint; rank 0 reads the labels once
        model.set_base_rates(from_main(train.positive_rates))
    model.to(cluster.device)
    b = config.balance
    distributed = cluster.world_size > 1
    names = {id(p): name for name, p in model.named_parameters()}
    balancer = build_balancer(b.balance, model.shared_parameters(), model.task_parameters(),
                              num_tasks=len(spec.tasks), relax_factor=b.relax_factor, beta=b.beta,
                              strategy=b.strategy, temperature=b.temperature, famo_lr=b.famo_lr,
                              famo_decay=b.famo_decay, famo_same_batch=b.famo_same_batch,
                              gradnorm_alpha=b.gradnorm_alpha,
                              reduce=cluster.sum_ if distributed else None,
                              gather=cluster.gather if distributed else None, world_size=cluster.world_size,
                              seed=config.train.seed, segments=model.shared_segments(),
                              shared_names=[names[id(p)] for p in model.shared_parameters()])
    optimizer = build_optimizer(model.parameters(), config, balancer.parameters())
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    bad_epochs, start_epoch = 0, 1
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            balancer.load_state_dict(state["balancer"])
            torch.set_rng_state(state["rng"])
            if cluster.device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], cluster.device)
            best, bad_epochs, start_epoch = state["best"], state["bad_epochs"], state["epoch"] + 1
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise MbtrainError(f"{out}/checkpoints/last.pt: cannot resume from it ({type(exc).__name__}: "
                               f"{first_line(exc)})") from None
        history = [row for row in _read_history(out / "history.jsonl") if row["epoch"] <= state["epoch"]]
        if main and best is not None and best["epoch"] == state["epoch"]:  # an interruption may have beaten best.pt
            save_checkpoint({k: v for k, v in state.items() if k != "format"}, out / "checkpoints" / "best.pt")

    steps = train.steps(config.train.batch_size, cluster.world_size)
    log = None
    if main and config.train.tensorboard:
        log = RunLog(work / "tensorboard", spec.tasks, steps_done=(start_epoch - 1) * steps)
    if main:
        write_json(_config_record(config, data_path, prepared), work / "config.json")
    ranks = f", {cluster.world_size} ranks" if cluster.world_size > 1 else ""
    console.print(f"[bold]mbtrain fit[/] {data_path}: {len(train):,} training rows, {len(valid):,} validation "
                  f"rows; {model_text(spec.model, spec.funnel)}, balance {b.balance}; tasks {', '.join(spec.tasks)} "
                  f"(main {spec.main_task}); data {prepared.path}; {cluster.device}{ranks}; run {out}",
                  soft_wrap=True)
    sample = _sample(valid) if main else None
    keep_freed_memory()  # from here on every step allocates and frees the same tensors
    started = time.perf_counter()
    patience = config.train.patience
    epoch = start_epoch - 1
    try:
        with _progress(console) as progress:
            for epoch in range(start_epoch, config.train.epochs + 1):
                if patience and bad_epochs >= patience:
                    epoch -= 1
                    break
                entry = train_epoch(model, optimizer, balancer, train, valid, spec.tasks, config, epoch, progress,
                                    cluster, log)
                score = _score(entry["valid"][spec.main_task], config.train.monitor)
                entry["best"] = best is None or score > best["score"]
                if entry["best"]:
                    best = {"epoch": epoch, "score": score, "metrics": entry["valid"]}
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                history.append(entry)
                # history first (resume drops lines past last.pt), best.pt last (never ahead of last.pt)
                if main:
                    checkpoint = {
                        "config": config.to_dict(),
                        "spec": spec.to_dict(),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "balancer": balancer.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "bad_epochs": bad_epochs,
                        "streamed": train.streamed,
                        "rng": torch.get_rng_state(),
                        **({"cuda_rng": torch.cuda.get_rng_state(cluster.device)}
                           if cluster.device.type == "cuda" else {}),
                        "sample": sample,
                    }
                    write_jsonl(history, work / "history.jsonl")
                    save_checkpoint(checkpoint, work / "checkpoints" / "last.pt")
                    if entry["best"]:
                        save_checkpoint(checkpoint, work / "checkpoints" / "best.pt")
                console.print(history_line(entry, spec.main_task, config.train.monitor), soft_wrap=True)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted(out, work, staging)) from None
    finally:
        if log is not None:
            log.close()
    stopped_early = bool(patience and bad_epochs >= patience and epoch < config.train.epochs)
    metrics = {
        "main_task": spec.main_task,
        "tasks": best["metrics"],
        "best_epoch": best["epoch"],
        "monitor": config.train.monitor,
        "epochs_run": epoch,
        "stopped_early": stopped_early,
        "evaluated_on": prepared.valid_source,
        "train_rows": len(train),
        "valid_rows": len(valid),
        "model": spec.model["model"],
        "balance": b.balance,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if main:
        write_json(metrics, work / "metrics.json")
        if staging:
            _swap(work, out)
    note = f"stopped early after epoch {epoch}; " if stopped_early else ""
    weighted = f" · task weights {_weights_text(b.task_weights)}" if b.task_weights else ""
    console.print(metrics_table(
        metrics, f"validation metrics, best epoch {best['epoch']} of {epoch}",
        f"{note}{model_text(spec.model, spec.funnel)} · balance {b.balance}{weighted} · {len(train):,} train / "
        f"{len(valid):,} valid rows · run saved in {out}",
    ))
    return metrics


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


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, balancer: Any,
                 train: Rows, valid: Rows, tasks: list[str],
                 config: RunConfig, epoch: int, progress: Progress, cluster: Cluster | None = None,
                 log: RunLog | None = None) -> dict[str, Any]:
    """One pass over the training rows (shuffled unless --no-shuffle), then validation; returns the
    history.jsonl entry.

    Under torchrun each rank takes its slice of every global batch of world_size × batch_size rows (in memory)
    or its own shard's batches (streamed), and its losses are divided by the global batch's rows: summed
    across ranks, that is one process's mean. Rank 0 alone validates (the exact AUC needs every row's
    prediction in one place) and hands the metrics to the others, which early stopping needs."""
    cluster = cluster or Cluster(0, 1, torch.device("cpu"))
    device = cluster.device
    started = time.perf_counter()
    batch_size = config.train.batch_size
    steps = train.steps(batch_size, cluster.world_size)
    bar = progress.add_task(f"epoch {epoch}/{config.train.epochs}", total=steps, loss="")
    lr = learning_rate(config, steps, (epoch - 1) * steps, cluster.world_size)
    seed = config.train.seed * 1_000_003 + epoch
    generator = torch.Generator().manual_seed(seed) if config.train.shuffle else None
    loss_sum = torch.zeros(len(tasks), device=device)
    ratio_sum = torch.zeros(len(tasks), device=device)
    weights = torch.tensor(config.weight_vector, device=device)  # --task-weights, applied before any balancer
    model.train()
    batches = train.batches(batch_size, generator, cluster.rank, cluster.world_size)
    if train.streamed:  # reads (and can fail) as it goes; data in memory cannot
        batches = _agreed(batches, cluster)
    for step, (batch, global_rows) in enumerate(batches, start=1):
        categorical, numeric = batch.categorical.to(device), batch.numeric.to(device)
        split = model.split_forward(categorical, numeric) if balancer.wants_split else None
        logits = split.logits if split is not None else model(categorical, numeric)
        labels = batch.labels.to(device)
        losses = _losses(logits, labels, global_rows)
        optimizer.zero_grad(set_to_none=True)
        balancer.backward(list((losses * weights).unbind()), split)
        global_step = (epoch - 1) * steps + step - 1
        lr = learning_rate(config, steps, global_step, cluster.world_size)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        if balancer.wants_losses_after_step:  # the same rows under the stepped parameters (FAMO)
            with torch.no_grad():
                after = _losses(model(categorical, numeric), labels, global_rows) * weights
            balancer.after_step(list(after.unbind()))
        if log is not None and global_step % LOG_EVERY == 0:
            log.step(global_step + 1, losses.detach() * global_rows / max(1, len(batch)), balancer.norm_ratios,
                     balancer.task_weights, balancer.ratio_names)
        loss_sum += losses.detach() * global_rows
        if balancer.grad_norm_ratio is not None:
            ratio_sum += balancer.grad_norm_ratio
        if step % PROGRESS_EVERY == 0 or step == steps:
            progress.update(bar, completed=step, loss=f"loss {float(losses.detach().sum()):.4f}")
    train_seconds = time.perf_counter() - started
    progress.remove_task(bar)
    cluster.sum_([loss_sum])
    balancer.epoch_end(loss_sum / len(train))
    entry: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": dict(zip(tasks, (loss_sum / len(train)).tolist(), strict=True)),
        "valid": from_main(lambda: validate(model, valid, tasks, config.funnel_tasks)),
        "seconds": round(time.perf_counter() - started, 4),
        "rows_per_second": round(len(train) / train_seconds, 1),
        "lr": lr,
    }
    if balancer.grad_norm_ratio is not None:
        entry["grad_norm_ratio"] = dict(zip(tasks, (ratio_sum / steps).tolist(), strict=True))
    if config.balance.task_weights:
        entry["task_weights"] = dict(zip(tasks, config.weight_vector, strict=True))
    if balancer.task_weights is not None:  # the epoch's last step's
        entry["balance_weights"] = dict(zip(tasks, balancer.task_weights.tolist(), strict=True))
    if log is not None:
        log.epoch(epoch * steps, entry)
    return entry


def _weights_text(weights: dict[str, float]) -> str:
    return ",".join(f"{task}={weight:g}" for task, weight in weights.items())


def _losses(logits: torch.Tensor, labels: torch.Tensor, global_rows: int) -> torch.Tensor:
    """[T] each task's summed log loss over this rank's rows, divided by the global batch's rows: summed across
    ranks, one process's mean."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(dim=0) / global_rows


def _score(main: dict[str, Any], monitor: str) -> float:
    """The best-epoch and early-stopping score, higher is better: the main task's --monitor metric (AUC and
    GAUC as they are, log loss and NE negated), or minus log loss where that metric is undefined (one class)."""
    value = main.get(monitor)
    if value is None:
        return -main["logloss"]
    return value if monitor in ("auc", "gauc") else -value


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
        disable=not console.is_terminal,
    )


def spec_of(state: dict[str, Any], path: Path) -> ModelSpec:
    try:
        return ModelSpec.from_dict(state["spec"])
    except (KeyError, ValueError, TypeError) as exc:
        raise MbtrainError(f"{path}: checkpoint holds no readable model spec ({type(exc).__name__})") from None


def _interrupted(out: Path, work: Path, staging: bool) -> str:
    if staging:
        return f"interrupted; {out} is unchanged, the unfinished run is in {work}"
    if (work / "checkpoints" / "last.pt").is_file():
        return f"interrupted; finished epochs are in {out}, continue with: mbtrain fit --resume --out {out}"
    return "interrupted before the first epoch finished; nothing to resume"


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
            "excluded": {c.name: c.reason for c in schema.columns if c.role == "excluded"},
        },
        "mbtrain_version": __version__,
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
