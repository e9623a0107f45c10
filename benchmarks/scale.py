"""Streaming vs in-memory at scale (`make bench-scale`): peak RSS and training rows/s at 1M, 5M and 20M rows.

Data: benchmarks/synthetic.py's impressions, generated and written 1M rows at a time (seed = chunk number,
row groups of 128k rows) into 20 files; the 1M / 5M / 20M datasets are directories of hard links to the
first 1, 5 and 20 files, so generation never holds more than 1M rows and the disk holds 20M rows once.

Each measurement runs in a fresh process, so its VmHWM (peak RSS) is its own:
- streaming: parquet_files → row_groups → infer_schema_streaming → fit_encoders_streaming → label_means
  (label_sums) → StreamingBatches (shuffle buffer sized from --memory-budget) → --steps steps;
- in-memory (1M and 5M by default; at 20M it would need ~11 GB, 2.4 × rows × column widths as measured at
  5M, more than a shared 24 GB machine should give a benchmark): read_parquet_files → infer_schema →
  Encoders.fit → encode → the same steps over a shuffled index (EncodedData.batches).
The steps: MMoE (the default model config), 3 tasks, batch --batch-size, sum of the task losses, Adam,
epochs chained when the data is shorter than the steps. Rows/s counts the step loop only; for streaming it
includes reading, encoding and shuffling the batches, and the first buffer's fill. Prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import _rss_mb  # noqa: E402
from synthetic import TASKS, impressions  # noqa: E402

from mbtrain.allocator import keep_freed_memory  # noqa: E402
from mbtrain.config import ModelConfig  # noqa: E402
from mbtrain.data import stream  # noqa: E402
from mbtrain.data.batches import EncodedData  # noqa: E402
from mbtrain.data.encoders import Encoders  # noqa: E402
from mbtrain.data.labels import LabelColumns  # noqa: E402
from mbtrain.data.schema import infer_schema  # noqa: E402
from mbtrain.models.scoring import ModelSpec  # noqa: E402
from mbtrain.optim import ADAM, TrainOptimizer  # noqa: E402

CHUNK_ROWS = 1_000_000
LABELS = LabelColumns(TASKS, ["binary"] * len(TASKS))
GROUP_ROWS = 131_072
SEED = 0


def generate(folder: Path, sizes: list[int], console: Console) -> dict[int, Path]:
    """One file per million rows, then one directory of hard links per dataset size."""
    chunks = max(sizes) // CHUNK_ROWS
    started = time.perf_counter()
    for chunk in range(chunks):
        impressions(CHUNK_ROWS, seed=chunk).write_parquet(folder / f"chunk-{chunk:03d}.parquet",
                                                          row_group_size=GROUP_ROWS)
    size_mb = sum(f.stat().st_size for f in folder.glob("chunk-*.parquet")) / 2**20
    console.print(f"generated {chunks * CHUNK_ROWS:,} rows in {chunks} files ({size_mb:,.0f} MB Parquet) in "
                  f"{time.perf_counter() - started:.0f}s")
    datasets = {}
    for rows in sizes:
        directory = folder / f"rows-{rows}"
        directory.mkdir()
        for chunk in range(rows // CHUNK_ROWS):
            os.link(folder / f"chunk-{chunk:03d}.parquet", directory / f"chunk-{chunk:03d}.parquet")
        datasets[rows] = directory
    return datasets


def _steps(spec: ModelSpec, rates: torch.Tensor, epochs: itertools.chain, steps: int) -> tuple[int, float]:
    """(rows, seconds) of `steps` training steps drawn from the chained epochs' batches."""
    torch.manual_seed(SEED)
    model = spec.build()
    model.set_base_logits(torch.logit(rates))
    optimizer = TrainOptimizer(model.parameters(), ADAM, lr=1e-3, weight_decay=0.0)  # as fit builds it
    rows = 0
    started = time.perf_counter()
    for batch, _ in itertools.islice(epochs, steps):
        losses = F.binary_cross_entropy_with_logits(model(batch.categorical, batch.numeric), batch.labels,
                                                    reduction="none").mean(dim=0)
        optimizer.zero_grad()
        sum(losses.unbind()).backward()
        optimizer.step()
        rows += len(batch)
    return rows, time.perf_counter() - started


def _epochs(data: EncodedData | stream.StreamingBatches, batch_size: int) -> itertools.chain:
    """Batches of epoch 1, 2, … seeded as the trainer seeds them."""
    return itertools.chain.from_iterable(
        data.batches(batch_size, torch.Generator().manual_seed(SEED * 1_000_003 + epoch))
        for epoch in itertools.count(1)
    )


def run_stage(args: argparse.Namespace) -> None:
    """In a child process: prepare one path, run the steps, print one JSON line."""
    torch.set_num_threads(args.threads)
    result: dict[str, float] = {"imports_mb": _rss_mb("VmRSS")}
    model = dict(vars(ModelConfig()))
    started = time.perf_counter()
    files = stream.parquet_files(args.data)
    if args.stage == "stream":
        parts = stream.row_groups(files)
        schema = stream.infer_schema_streaming(parts, str(args.data), TASKS)
        encoders = stream.fit_encoders_streaming(stream.scan_row_groups(parts), schema.categorical, schema.numeric,
                                                 min_frequency=2)
        result["buffer_rows"] = stream.buffer_rows_for(args.memory_budget, encoders, TASKS)
        data: EncodedData | stream.StreamingBatches = stream.StreamingBatches(parts, encoders, LABELS,
                                                                              int(result["buffer_rows"]))
    else:
        frame = stream.read_parquet_files(files)
        schema = infer_schema(frame, str(args.data), TASKS)
        encoders = Encoders.fit(frame, schema.categorical, schema.numeric, min_frequency=2)
        labels = LABELS.read(frame, str(args.data))
        data = EncodedData(*encoders.encode(frame, str(args.data)), labels)
        del frame
    rates = data.label_sums().mean().float()
    result["prepare_s"] = time.perf_counter() - started
    result["prepared_mb"] = _rss_mb("VmHWM")
    keep_freed_memory()  # as `mbtrain fit` does before its first step
    rows, seconds = _steps(ModelSpec(TASKS, encoders, model), rates, _epochs(data, args.batch_size), args.steps)
    result["rows_per_s"] = rows / seconds
    result["peak_mb"] = _rss_mb("VmHWM")
    result["estimate_mb"] = stream.estimate_in_memory_bytes(files) / 2**20
    print(json.dumps(result))


def measure(stage: str, data: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--stage", stage, "--data", str(data), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--memory-budget", args.budget_text,
               "--threads", str(args.threads)]
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{stage} on {data} failed:\n{done.stderr}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000],
                        help="dataset sizes, multiples of 1M rows")
    parser.add_argument("--in-memory-sizes", type=int, nargs="*", default=[1_000_000, 5_000_000])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--memory-budget", dest="budget_text", default="1G",
                        help="sizes the streaming shuffle buffer (a quarter of it, see buffer_rows_for)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; medians are shown")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the generated files go (deleted at the end)")
    parser.add_argument("--stage", choices=["stream", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.memory_budget = stream.parse_memory_budget(args.budget_text)
    if args.stage:
        run_stage(args)
        return
    console = Console(width=150)
    free_gb = shutil.disk_usage(args.folder).free / 2**30
    needed_gb = max(args.sizes) / CHUNK_ROWS * 0.06  # ~60 MB of Parquet per million rows
    console.print(f"{args.folder}: {free_gb:,.0f} GB free, about {needed_gb:.1f} GB needed")
    if free_gb < 2 * needed_gb:
        raise SystemExit(f"not enough free disk in {args.folder}; pass --folder")
    folder = Path(tempfile.mkdtemp(prefix="mbtrain-scale-", dir=args.folder))
    try:
        datasets = generate(folder, args.sizes, console)
        runs: dict[tuple[int, str], list[dict[str, float]]] = {}
        for _ in range(args.repeats):  # repeats interleaved, so that machine noise hits every cell alike
            for rows, data in datasets.items():
                for stage in ("stream", "memory") if rows in args.in_memory_sizes else ("stream",):
                    runs.setdefault((rows, stage), []).append(measure(stage, data, args))
                    console.print(f"  {rows:,} rows {stage}: {runs[rows, stage][-1]}", soft_wrap=True)
    finally:
        shutil.rmtree(folder)
    report(runs, args, console)


def report(runs: dict[tuple[int, str], list[dict[str, float]]], args: argparse.Namespace, console: Console) -> None:
    cell = {key: {field: statistics.median(r[field] for r in results) for field in results[0]}
            for key, results in runs.items()}
    table = Table(title=f"{args.steps} steps of batch {args.batch_size}, MMoE, 3 tasks, {args.threads} threads; "
                        f"--memory-budget {args.budget_text}; median of {args.repeats}")
    for column in ("rows", "path", "prepare s", "train rows/s", "peak RSS MB", "RSS after imports MB",
                   "peak after prepare MB", "shuffle buffer rows", "in-memory estimate MB", "load avg before"):
        table.add_column(column, justify="right")
    for (rows, stage), c in sorted(cell.items()):
        table.add_row(f"{rows:,}", "streaming" if stage == "stream" else "in-memory", f"{c['prepare_s']:.1f}",
                      f"{c['rows_per_s']:,.0f}", f"{c['peak_mb']:,.0f}", f"{c['imports_mb']:,.0f}",
                      f"{c['prepared_mb']:,.0f}", f"{c['buffer_rows']:,.0f}" if "buffer_rows" in c else "",
                      f"{c['estimate_mb']:,.0f}", f"{c['load_before']:.1f}")
    console.print(table)
    sizes = sorted(rows for rows, stage in cell if stage == "stream")
    if len(sizes) > 1:
        low, high = sizes[-2], sizes[-1]
        ratio = cell[high, "stream"]["peak_mb"] / cell[low, "stream"]["peak_mb"]
        console.print(f"streaming peak RSS {high:,} / {low:,} rows: {ratio:.2f}× (target ≤ 1.5×)")
    for rows in sorted(r for r, stage in cell if stage == "memory"):
        ratio = cell[rows, "stream"]["rows_per_s"] / cell[rows, "memory"]["rows_per_s"]
        console.print(f"streaming / in-memory train rows/s at {rows:,} rows: {ratio:.2f} (target ≥ 0.70)")


if __name__ == "__main__":
    main()
