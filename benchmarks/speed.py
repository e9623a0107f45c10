"""What MetaBalance costs, and what reading + encoding costs: figures printed in one run (`make bench`).

Training: one generated impression log (default 200k rows, ~20k users, 3 tasks, MMoE 8 experts [64,32]),
encoded once; the variants `none`, `metabalance` (ours) and `naive` (the widely copied per-task full
backward with a Python loop over parameters, written here as a baseline), or any balancers (`NAME@LEVEL` for
a --balance-level: `pcgrad@representation`; `/batched` after either for --task-backward batched:
`metabalance/batched`; `--every-balancer`: each registered one at each of its levels), on
each of `--models` (MMoE by default; `ple`, `esmm`, `mmoe+funnel`, ...) train epochs in turn, interleaved, so machine
noise hits all of them alike. Seconds per epoch are training plus validation,
as in history.jsonl; ratios are against `none` within the same round.

Encoding: a generated Parquet file (default 2M rows, 30 feature columns of strings, ints, floats and
nulls) is read by polars alone and by mbtrain's full path before training (`prepare`: read, infer roles,
hold out validation rows, fit encoders on the training rows, encode to tensors), each in a fresh
process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TASKS, impressions  # noqa: E402

from mbtrain.allocator import keep_freed_memory  # noqa: E402
from mbtrain.balance import BALANCERS, Balancer, Setup, build_balancer  # noqa: E402
from mbtrain.balance.per_task import LOOP, PARAMETERS  # noqa: E402
from mbtrain.config import RunConfig  # noqa: E402
from mbtrain.data.prepare import prepare  # noqa: E402
from mbtrain.distributed import Cluster  # noqa: E402
from mbtrain.models.scoring import ModelSpec  # noqa: E402
from mbtrain.train import Bar, build_optimizer, train_epoch  # noqa: E402


class NaiveMetaBalance(Balancer):
    """The widely copied MetaBalance: a full backward per task, a Python loop per parameter, floats on the host.

    Kept exact (no `break` at the first parameter without a gradient) so it differs from ours in cost only.
    """

    def __init__(self, shared: Sequence[torch.Tensor], relax_factor: float = 0.7, beta: float = 0.9) -> None:
        self.shared, self.relax_factor, self.beta = list(shared), relax_factor, beta
        self.moving: list[list[float]] | None = None
        self.grad_norm_ratio = None

    def backward(self, losses: Sequence[torch.Tensor], split: None = None) -> None:
        per_task = []
        for k, loss in enumerate(losses):
            for p in self.shared:
                p.grad = None
            loss.backward(retain_graph=k < len(losses) - 1)
            per_task.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.shared])
        if self.moving is None:
            self.moving = [[0.0] * len(self.shared) for _ in losses]
        for i, p in enumerate(self.shared):
            total = per_task[0][i].clone()
            for k in range(len(losses)):
                norm = per_task[k][i].norm().item()
                self.moving[k][i] = self.beta * self.moving[k][i] + (1 - self.beta) * norm
                if k:
                    scale = self.moving[0][i] / (self.moving[k][i] + 1e-5)
                    total += per_task[k][i] * (self.relax_factor * scale + 1 - self.relax_factor)
            p.grad = total

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def bench_training(args: argparse.Namespace, console: Console) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.parquet"
        impressions(args.rows, users=args.users).write_parquet(path)
        config = RunConfig().updated({"tasks": TASKS, "epochs": args.rounds, "seed": 0, "patience": 0,
                                      "batch_size": args.batch_size})
        started = time.perf_counter()
        prepared = prepare(config, path)
        console.print(f"training data: {len(prepared.train):,} train / {len(prepared.valid):,} valid rows, "
                      f"{sum(prepared.encoders.cardinalities):,} embedding rows, encoded in "
                      f"{time.perf_counter() - started:.1f}s")
    device = torch.device(args.device)
    cluster = Cluster(0, 1, device)
    runs = {}
    for architecture in args.models:
        spec = _with_model(ModelSpec(TASKS, prepared.encoders, dataclasses.asdict(config.model)), architecture)
        for variant in args.variants:
            torch.manual_seed(0)
            model = spec.build().to(device)
            if variant == "naive":
                balancer: Balancer = NaiveMetaBalance(model.shared_parameters())
            else:
                balancer = build_variant(variant, model)
            optimizer = build_optimizer(model.parameters(), config, balancer.parameters())
            runs[architecture, variant] = (model, optimizer, balancer, [], [])
    steps = prepared.train.steps(config.train.batch_size)
    keep_freed_memory()  # as `mbtrain fit` does before its first step
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
            for model, optimizer, balancer, epochs, trains in runs.values():
                bar = Bar.over_run(progress, steps, args.rounds + 1, round_ * steps, config.train.batch_size)
                entry = train_epoch(model, optimizer, balancer, prepared.train, prepared.valid, prepared.tasks,
                                    config, round_ + 1, bar, cluster)
                progress.remove_task(bar.task)
                if round_:
                    epochs.append(entry["seconds"])
                    trains.append(len(prepared.train) / entry["rows_per_second"])
    first = args.models[0]
    table = Table(title=f"seconds per epoch, {args.rows:,} rows, {args.users:,} users, 3 tasks, batch "
                        f"{args.batch_size}, {device}, "
                        f"{args.threads} threads, median of {args.rounds} interleaved rounds; × none: against the "
                        f"same model's plain sum; × {first}: against {first}'s, the epoch's training part")
    for column in ("model", "balance", "epoch s (train+valid)", "train s", "ms/step", "× none (epoch)",
                   "× none (train)", "per-round × none", f"× {first} none (train)"):
        table.add_column(column, justify="right")
    for (architecture, variant), (_, _, _, epochs, trains) in runs.items():
        base_epochs, base_trains = runs[architecture, "none"][3:5] if "none" in args.variants else (epochs, trains)
        ratios = [e / b for e, b in zip(epochs, base_epochs, strict=True)]
        first_trains = runs[first, "none"][4] if "none" in args.variants else trains
        table.add_row(architecture, variant, f"{statistics.median(epochs):.2f}", f"{statistics.median(trains):.2f}",
                      f"{1000 * statistics.median(trains) / steps:.1f}",
                      f"{statistics.median(epochs) / statistics.median(base_epochs):.2f}",
                      f"{statistics.median(trains) / statistics.median(base_trains):.2f}",
                      " ".join(f"{r:.2f}" for r in ratios),
                      f"{statistics.median(trains) / statistics.median(first_trains):.2f}")
    console.print(table)


def build_variant(variant: str, model: torch.nn.Module) -> Balancer:
    """The balancer a variant names: NAME, NAME@LEVEL (a --balance-level) and, after either, /batched for
    --task-backward batched (`metabalance/batched`, `pcgrad@representation/batched`)."""
    spec, _, task_backward = variant.partition("/")
    name, _, level = spec.partition("@")
    return build_balancer(name, Setup.of(model, len(TASKS), level=level or PARAMETERS,
                                         task_backward=task_backward or LOOP))


def every_balancer() -> list[str]:
    """Each registered balancer at each of its levels (a loss-level one once), the plain sum first."""
    return [name if level == PARAMETERS else f"{name}@{level}"
            for name, kind in BALANCERS.items() for level in kind.levels or (PARAMETERS,)]


def _with_model(spec: ModelSpec, architecture: str) -> ModelSpec:
    """The spec with another model; "esmm" and "NAME+funnel" predict the click → cart → purchase funnel."""
    name, _, funnel = architecture.partition("+")
    stages = list(reversed(TASKS)) if funnel or name == "esmm" else None
    return ModelSpec(spec.tasks, spec.encoders, {**spec.model, "model": name}, stages)


def _stage(stage: str, path: Path) -> None:
    """Run in a child process: one stage, then print its time and peak RSS as JSON."""
    import polars as pl

    baseline = _rss_mb("VmRSS")
    started = time.perf_counter()
    result: dict[str, float] = {}
    if stage == "read":
        frame = pl.read_parquet(path)
        result["rows"] = frame.height
    else:  # what `mbtrain fit` does before its first step: read, roles, split, fit encoders, encode
        prepared = prepare(RunConfig().updated({"tasks": TASKS}), path)
        tensors = [prepared.train.categorical, prepared.train.numeric, prepared.train.labels,
                   prepared.valid.categorical, prepared.valid.numeric, prepared.valid.labels]
        result["tensor_mb"] = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        result["columns"] = prepared.train.categorical.shape[1] + prepared.train.numeric.shape[1]
    result["seconds"] = time.perf_counter() - started
    peak = _rss_mb("VmHWM")
    result["peak_mb"] = peak
    result["added_mb"] = peak - baseline
    print(json.dumps(result))


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB; unlike ru_maxrss, VmHWM starts afresh at exec,
    so a child does not inherit the benchmark parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_encoding(args: argparse.Namespace, console: Console) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "encode.parquet"
        impressions(args.encode_rows, users=200_000, items=50_000, extra=23, seed=1).write_parquet(path)
        size_mb = path.stat().st_size / 2**20
        results: dict[str, list[dict]] = {"read": [], "encode": []}
        for _ in range(args.encode_repeats):
            for stage in results:
                output = subprocess.run([sys.executable, __file__, "--stage", stage, "--path", str(path)],
                                        check=True, capture_output=True, text=True).stdout
                results[stage].append(json.loads(output.strip().splitlines()[-1]))
    read = statistics.median(r["seconds"] for r in results["read"])
    encode = statistics.median(r["seconds"] for r in results["encode"])
    last = results["encode"][-1]
    table = Table(title=f"reading + encoding {args.encode_rows:,} rows, {int(last['columns'])} feature columns "
                        f"(Parquet {size_mb:.0f} MB), median of {args.encode_repeats}")
    for column in ("stage", "seconds", "× polars read", "peak RSS MB", "RSS added MB", "tensors MB",
                   "added / tensors"):
        table.add_column(column, justify="right")
    table.add_row("polars.read_parquet", f"{read:.2f}", "1.00", f"{results['read'][-1]['peak_mb']:.0f}",
                  f"{results['read'][-1]['added_mb']:.0f}", "", "")
    table.add_row("mbtrain prepare", f"{encode:.2f}", f"{encode / read:.2f}", f"{last['peak_mb']:.0f}",
                  f"{last['added_mb']:.0f}", f"{last['tensor_mb']:.0f}", f"{last['added_mb'] / last['tensor_mb']:.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=RunConfig().train.batch_size)
    parser.add_argument("--variants", nargs="+", default=["none", "metabalance", "naive"])
    parser.add_argument("--every-balancer", action="store_true",
                        help="every registered balancer at each of its levels instead of --variants")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the batches move to it step by step)")
    parser.add_argument("--models", nargs="+", default=["mmoe"],
                        help="models to time each variant on: shared-bottom, mmoe, ple, esmm, or NAME+funnel")
    parser.add_argument("--encode-rows", type=int, default=2_000_000)
    parser.add_argument("--encode-repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["training", "encoding"])
    parser.add_argument("--stage", choices=["read", "encode"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        _stage(args.stage, args.path)
        return
    console = Console(width=150)
    if args.every_balancer:
        args.variants = every_balancer()
    if "training" not in args.skip:
        bench_training(args, console)
    if "encoding" not in args.skip:
        bench_encoding(args, console)


if __name__ == "__main__":
    main()
