"""Which training defaults (learning rate, schedule, hidden-layer norm, warm-up) to ship, by measurement.

Every recipe (a set of overrides on the current defaults) trains MMoE (8 experts, hidden [64, 32], embed 8,
towers [16]) with MetaBalance, one run per seed, on each data set and setting below; the best checkpoint
(by main-task validation AUC on mbtrain's own 10% hold-out) is scored on a test part it never saw:

- Adult (../shared/data/adult): seeded 80/20 split; `--epochs 3 --patience 0`, and the default epochs with
  early stopping. Reports income_50k (main) and never_married test AUC.
- the bundled sample funnel (sample_data/): funnel_train.parquet → funnel_test.parquet; batch 1024 with the
  default epochs and patience, and `make demo`'s setting (batch 128, 15 epochs). Reports purchase (main) and
  click test AUC. Its test file has 19 purchases, so the purchase AUC is noisy.
- a generated funnel (benchmarks/synthetic.py, generated from each seed), seeded 80/20 split, default epochs
  and patience. Reports purchase (main) test AUC.

The seed sets the split, the generated data, the initialisation and the row order, and is the same for
every recipe, so recipes can also be compared seed by seed in the `--json` output. Prints one table per
data set (mean ± sample std over seeds, mean best epoch, mean seconds per epoch including validation);
asserts nothing. `--quick` is a smoke test (first seed, at most 2 epochs, 20k generated rows).

Run one process with one thread, e.g.
    POLARS_MAX_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/defaults_sweep.py --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for synthetic.py when run as a script

from synthetic import impressions  # noqa: E402

from mbtrain.config import RunConfig  # noqa: E402
from mbtrain.inference import evaluate  # noqa: E402
from mbtrain.train import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADULT = ROOT.parent / "shared" / "data" / "adult" / "adult.parquet"
SAMPLE = ROOT / "sample_data"
FUNNEL_TASKS = ["purchase", "cart", "click"]
# the sample's later columns stay out, so that its runs see the columns they were first measured on:
# dwell_seconds (a regression label, null exactly where click = 0: a feature would leak click) and item_vec
SAMPLE_EXCLUDE = ["impression_id", "dwell_seconds", "item_vec"]

# The model sizes, pinned here so that a later change of the model defaults does not move the sweep.
MODEL = {"model": "mmoe", "experts": 8, "hidden": [64, 32], "embed_dim": 8, "tower": [16], "balance": "metabalance"}
CURRENT = {"lr": 1e-3, "norm": "none", "schedule": "constant", "warmup": 0.0}  # the defaults before this sweep


SHIPPED = {"lr": None, "norm": "none", "schedule": "constant", "warmup": 0.0}  # lr None: the batch-scaled default


def recipe(**changes: Any) -> dict[str, Any]:
    return {**CURRENT, **changes}


RECIPES: dict[str, dict[str, Any]] = {
    "current (1e-3 none const)": recipe(),
    "shipped (0.01 × batch/1024)": SHIPPED,
    "shipped + dropout 0.1": {**SHIPPED, "dropout": 0.1},
    "shipped + dropout 0.2": {**SHIPPED, "dropout": 0.2},
    "shipped + weight decay 1e-5": {**SHIPPED, "weight_decay": 1e-5},
    "1e-2 none const": recipe(lr=1e-2),
    "3e-3 none const": recipe(lr=3e-3),
    "1e-2 none cos": recipe(lr=1e-2, schedule="cosine"),
    "3e-3 none cos": recipe(lr=3e-3, schedule="cosine"),
    "1e-3 batch const": recipe(norm="batch"),
    "3e-3 batch cos": recipe(lr=3e-3, norm="batch", schedule="cosine"),
    "1e-2 batch cos": recipe(lr=1e-2, norm="batch", schedule="cosine"),
    "3e-3 layer cos": recipe(lr=3e-3, norm="layer", schedule="cosine"),
    "1e-2 layer cos": recipe(lr=1e-2, norm="layer", schedule="cosine"),
    "1e-2 batch cos warm1": recipe(lr=1e-2, norm="batch", schedule="cosine", warmup=1.0),
    "1e-2 none cos warm1": recipe(lr=1e-2, schedule="cosine", warmup=1.0),
    "5e-3 batch cos": recipe(lr=5e-3, norm="batch", schedule="cosine"),
}


@dataclass
class Setting:
    """One way of training and scoring on one data set."""

    dataset: str
    name: str
    tasks: list[str]
    reported: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)


SETTINGS = [
    Setting("adult", "3 epochs", ["income_50k", "never_married"], ["income_50k", "never_married"],
            {"epochs": 3, "patience": 0}),
    Setting("adult", "early stop", ["income_50k", "never_married"], ["income_50k", "never_married"]),
    Setting("sample funnel", "bs 1024", FUNNEL_TASKS, ["purchase", "click"], {"exclude": SAMPLE_EXCLUDE}),
    Setting("sample funnel", "demo: bs 128, 15 ep", FUNNEL_TASKS, ["purchase", "click"],
            {"exclude": SAMPLE_EXCLUDE, "batch_size": 128, "epochs": 15}),
    Setting("generated funnel", "early stop", FUNNEL_TASKS, ["purchase"]),
]
TITLES = {
    "adult": "Adult, MMoE + MetaBalance, seeded 80/20 split: test AUC",
    "sample funnel": "Sample funnel (sample_data), MMoE + MetaBalance: test AUC on funnel_test.parquet",
    "generated funnel": "Generated funnel (synthetic.py, {rows:,} rows), MMoE + MetaBalance, 80/20 split: test AUC",
}
CAPTIONS = {
    "adult": "targets: income_50k ≥ 0.928 after 3 epochs, ≥ 0.932 with the default epochs and early stopping",
    "sample funnel": "defaults' epochs and patience at batch 1024; the demo's setting (make demo) at batch 128",
    "generated funnel": "default epochs and patience, batch 1024",
}


def split(frame: pl.DataFrame, seed: int, folder: Path) -> tuple[Path, Path]:
    """A seeded 80/20 train / test split, as benchmarks/adult_quality.py makes it."""
    order = torch.randperm(frame.height, generator=torch.Generator().manual_seed(seed)).numpy()
    cut = int(frame.height * 0.8)
    folder.mkdir(parents=True, exist_ok=True)
    frame[order[:cut]].write_parquet(folder / "train.parquet")
    frame[order[cut:]].write_parquet(folder / "test.parquet")
    return folder / "train.parquet", folder / "test.parquet"


def data_files(dataset: str, seed: int, root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    if dataset == "adult":
        return split(pl.read_parquet(args.data), seed, root / f"adult-{seed}")
    if dataset == "sample funnel":
        return SAMPLE / "funnel_train.parquet", SAMPLE / "funnel_test.parquet"
    return split(impressions(rows=args.rows, seed=seed), seed, root / f"generated-{seed}")


def run_one(setting: Setting, name: str, seed: int, train: Path, test: Path, out: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    """Train one recipe on one setting and seed; the row of the --json output (with `error` if it failed)."""
    overrides = {**MODEL, **RECIPES[name], **setting.overrides, "tasks": setting.tasks, "seed": seed,
                 "threads": args.threads}
    if args.quick:
        overrides["epochs"] = min(overrides.get("epochs", RunConfig().train.epochs), 2)
    row: dict[str, Any] = {"dataset": setting.dataset, "setting": setting.name, "recipe": name, "seed": seed}
    return train_and_score(row, overrides, train, test, out)


def train_and_score(row: dict[str, Any], overrides: dict[str, Any], train: Path, test: Path, out: Path
                    ) -> dict[str, Any]:
    """Fit with `overrides` on `train` into `out` and score the best checkpoint on `test`: `row` (of the --json
    output) with the settings and results added, or `error` where the run failed (a result too)."""
    row["overrides"] = overrides
    started = time.perf_counter()
    try:
        metrics = fit(RunConfig().updated(overrides), train, out, console=Console(quiet=True), overwrite=True)
        test_tasks = evaluate(out, test)["tasks"]
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        row.update({
            "test": {task: {"auc": m["auc"], "logloss": m["logloss"]} for task, m in test_tasks.items()},
            "valid_main_auc": metrics["tasks"][metrics["main_task"]]["auc"],
            "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"],
            "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
            "final_train_loss": history[-1].get("train_loss"),
        })
    except Exception as exc:  # one failed run is a result too: record it and go on
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["wall_seconds"] = round(time.perf_counter() - started, 2)
    return row


def splits(args: argparse.Namespace) -> Iterator[tuple[str, int, Path, Path, Path]]:
    """(data set, seed, training file, test file, the run directory to reuse) for each of --datasets × --seeds,
    in a temporary folder that goes at the end."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for dataset in args.datasets:
            for seed in args.seeds:
                yield dataset, seed, *data_files(dataset, seed, root, args), root / "run"


def auc(row: dict[str, Any] | None, task: str) -> float | None:
    """The row's finite test AUC for `task`, or None (failed run, or no AUC: one class only)."""
    if row is None or "error" in row:
        return None
    value = row["test"].get(task, {}).get("auc")
    return value if value is not None and math.isfinite(value) else None


def keep(row: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace, log: Console, label: str,
         tasks: list[str], started: float) -> None:
    """Add a finished run's row to `rows` (rewriting --json) and log one line about it."""
    rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    shown = row.get("error") or "  ".join(f"{task} {auc(row, task) or float('nan'):.4f}" for task in tasks)
    log.print(f"[{time.perf_counter() - started:6.0f}s] {label}: {shown}  best {row.get('best_epoch')}/"
              f"{row.get('epochs_run')}  {row.get('seconds_per_epoch', 0):.2f} s/epoch  {row['wall_seconds']}s",
              soft_wrap=True, markup=False, highlight=False)


def summary(values: list[float | None], digits: int = 4) -> str:
    """'mean ± std' of the finite values, with a note of how many runs gave none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "—"
    text = f"{statistics.fmean(finite):.{digits}f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.{digits}f}"
    missing = len(values) - len(finite)
    return text + (f" ({missing} missing)" if missing else "")


def table(dataset: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    settings = [s for s in SETTINGS if s.dataset == dataset]
    result = Table(title=TITLES[dataset].format(rows=args.rows), caption=CAPTIONS[dataset])
    result.add_column("recipe")
    for s in settings:
        for task in s.reported:
            result.add_column(f"{task}\n{s.name}", justify="right")
        result.add_column(f"best ep\n{s.name}", justify="right")
        result.add_column(f"s/epoch\n{s.name}", justify="right")
    for name in args.recipes:
        cells = [name]
        for s in settings:
            runs = [r for r in rows if r["setting"] == s.name and r["dataset"] == dataset and r["recipe"] == name]
            done = [r for r in runs if "error" not in r]
            for task in s.reported:
                cells.append(summary([r["test"][task]["auc"] for r in done] + [None] * (len(runs) - len(done))))
            cells.append(summary([r["best_epoch"] for r in done], 1))
            cells.append(summary([r["seconds_per_epoch"] for r in done], 2).split(" ±")[0])
        result.add_row(*cells)
    return result


def run_arguments(description: str, datasets: list[str], *, seeds: list[int], threads: int, rows: int,
                  quick_rows: int) -> argparse.ArgumentParser:
    """The flags a quality benchmark over seeds and data sets takes (this one and balancers.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--datasets", nargs="+", default=datasets, choices=datasets, metavar="DATASET",
                        help=f"a subset of: {', '.join(repr(d) for d in datasets)}")
    parser.add_argument("--rows", type=int, default=rows, help="rows of the generated funnel")
    parser.add_argument("--data", type=Path, default=ADULT, help="the Adult parquet file")
    parser.add_argument("--json", type=Path, help="write every run's results here (rewritten after each run)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: first seed, ≤ 2 epochs, {quick_rows:,} generated rows")
    parser.set_defaults(quick_rows=quick_rows)
    return parser


def main() -> None:
    parser = run_arguments(__doc__, list(TITLES), seeds=[0, 1, 2], threads=1, rows=100_000, quick_rows=20_000)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), metavar="RECIPE",
                        help=f"a subset of: {', '.join(repr(r) for r in RECIPES)}")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rows = args.seeds[:1], min(args.rows, args.quick_rows)

    console = Console(width=250)
    log = Console(stderr=True, width=250)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for dataset, seed, train, test, out in splits(args):
        for setting in (s for s in SETTINGS if s.dataset == dataset):
            for name in args.recipes:
                row = run_one(setting, name, seed, train, test, out, args)
                keep(row, rows, args, log, f"{dataset} / {setting.name} / {name} / seed {seed}", setting.reported,
                     started)
    for dataset in args.datasets:
        console.print(table(dataset, rows, args))
    failed = [r for r in rows if "error" in r]
    console.print(f"{len(rows)} runs, {len(failed)} failed, {time.perf_counter() - started:.0f} s wall")


if __name__ == "__main__":
    main()
