"""Operations per training step: how many ATen operators one step of each balancer dispatches, and where its time
goes; then the step time at a small batch, where per-operation overhead dominates (as it does on a GPU, where a
recommendation model's step is short).

One generated impression log (benchmarks/synthetic.py, `--rows`, 3 tasks), the default MMoE; for each variant
(`NAME`, `NAME@LEVEL`, either with `/batched`: `multibalance`, `pcgrad@representation`,
`metabalance/batched`, as in benchmarks/speed.py) the fit loop's step — forward (split where the
balancer wants it), losses, the balancer's backward, fused Adam — is profiled with torch.profiler over
`--profiled` steps at `--batch` rows after `--warmup` steps. Counted: every `aten::` operator event, and the
top-level ones (dispatched from Python or autograd, not from inside another operator): the latter is what a
GPU launches kernels for, roughly. Printed: both counts per step and their ratio to the plain sum, and the
operators with the largest share of the step's self CPU time. Then the median step time at `--small-batch`
rows over `--timed` steps.

    .venv/bin/python benchmarks/ops.py                        # none, metabalance, multibalance, pcgrad
    .venv/bin/python benchmarks/ops.py --variants none uncertainty dwa --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build_variant  # noqa: E402
from synthetic import TASKS, impressions  # noqa: E402

from mbtrain.balance import Balancer  # noqa: E402
from mbtrain.config import RunConfig  # noqa: E402
from mbtrain.data.prepare import Prepared, prepare  # noqa: E402
from mbtrain.models.scoring import ModelSpec  # noqa: E402
from mbtrain.train import build_optimizer  # noqa: E402

Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # categorical, numeric, labels on the device


def batches(prepared: Prepared, rows: int, count: int, device: torch.device) -> list[Step]:
    """`count` training batches of `rows` rows, on the device before any step is measured."""
    found = []
    generator = torch.Generator().manual_seed(0)
    while len(found) < count:
        for batch, _ in prepared.train.batches(rows, generator, 0, 1):
            found.append((batch.categorical.to(device), batch.numeric.to(device), batch.labels.to(device)))
            if len(found) == count:
                break
    return found


def trainer(spec: ModelSpec, variant: str, config: RunConfig, device: torch.device):
    """The fit loop's step for one variant, as a function of a batch."""
    torch.manual_seed(0)
    model = spec.build().to(device)
    balancer: Balancer = build_variant(variant, model)
    optimizer = build_optimizer(model.parameters(), config, balancer.parameters())

    def step(batch: Step) -> None:
        categorical, numeric, labels = batch
        split = model.split_forward(categorical, numeric) if balancer.wants_split else None
        logits = split.logits if split is not None else model(categorical, numeric)
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
        optimizer.zero_grad()
        balancer.backward(list(losses.unbind()), split)
        optimizer.step()

    return step


def count_operators(step, steps: list[Step], device: torch.device) -> tuple[float, float, list[tuple[str, float]]]:
    """(aten operators per step, top-level ones per step, [(operator, share of self CPU time)] largest first)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for batch in steps:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = [e for e in profiler.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    self_time: Counter[str] = Counter()
    for event in events:
        self_time[event.name] += event.self_cpu_time_total
    total = sum(self_time.values()) or 1.0
    shares = [(name, value / total) for name, value in self_time.most_common(6)]
    return len(events) / len(steps), len(top) / len(steps), shares


def time_steps(step, steps: list[Step], device: torch.device) -> float:
    """The median wall time of one step, ms."""
    times = []
    for batch in steps:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--variants", nargs="+", default=["none", "metabalance", "multibalance", "pcgrad"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--small-batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profiled", type=int, default=10)
    parser.add_argument("--timed", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.parquet"
        impressions(args.rows).write_parquet(path)
        config = RunConfig().updated({"tasks": TASKS, "seed": 0})
        prepared = prepare(config, path)
    spec = ModelSpec(TASKS, prepared.encoders, vars(config.model))
    large = batches(prepared, args.batch, args.warmup + args.profiled, device)
    small = batches(prepared, args.small_batch, args.warmup + args.timed, device)
    table = Table(title=f"one training step, MMoE, 3 tasks, {device}, {args.threads} threads: ATen operators at "
                        f"batch {args.batch} (mean of {args.profiled} profiled steps), step time at batch "
                        f"{args.small_batch} (median of {args.timed})")
    for column in ("balance", "aten ops", "× none", "top-level ops", "× none", f"ms/step @{args.small_batch}",
                   "× none", "largest self-time shares"):
        table.add_column(column, justify="left" if column in ("balance", "largest self-time shares") else "right")
    base = None
    for variant in args.variants:
        step = trainer(spec, variant, config, device)
        for batch in large[: args.warmup]:
            step(batch)
        ops, top, shares = count_operators(step, large[args.warmup :], device)
        for batch in small[: args.warmup]:
            step(batch)
        ms = time_steps(step, small[args.warmup :], device)
        base = base or (ops, top, ms)
        table.add_row(variant, f"{ops:.0f}", f"{ops / base[0]:.2f}", f"{top:.0f}", f"{top / base[1]:.2f}",
                      f"{ms:.2f}", f"{ms / base[2]:.2f}",
                      ", ".join(f"{name.removeprefix('aten::')} {share:.0%}" for name, share in shares))
    console.print(table)


if __name__ == "__main__":
    main()
