"""Does each loss balancer beat the plain sum of the task losses, and at what cost per epoch? By measurement.

Every balancer in mbtrain.balance.BALANCERS, each with its defaults, trains the default model (MMoE with the
RunConfig defaults: 8 experts [64, 32], embed 8, towers [16], batch 1024, the default learning rate, 10 epochs,
early stopping with patience 3 on main-task validation AUC from mbtrain's own 10% hold-out of the training
file); the best checkpoint is scored on a test part it never saw. Data sets:

- Adult (../shared/data/adult): income_50k (main) and never_married, seeded 80/20 split.
- the bundled sample funnel (sample_data/): purchase (main), cart, click; funnel_train.parquet →
  funnel_test.csv. The split is fixed, the seed changes the initialisation, row order and hold-out. Its test
  file has 19 purchases, so the purchase AUC is noisy.
- a generated funnel (benchmarks/synthetic.py, `--rows` rows generated from each seed, seeded 80/20 split):
  purchase (rare, main) ← cart ← click, where the frequent auxiliary tasks' gradients dominate.

Within each data set and seed every balancer runs in turn (interleaved), so machine noise hits all alike.
Prints one table per data set: per balancer the main-task test AUC (mean ± sample std over seeds), each
auxiliary task's test AUC, the main-task AUC difference to `none` paired by seed (mean, and on how many seeds
it is higher), whether it beats `none` (mean paired difference > 0 and higher on at least half the seeds),
and its epoch time over the plain sum's (per seed: mean seconds per epoch, validation included, over that of
`none` on the same data and seed; the median over seeds). Asserts nothing; a failed run is recorded with its
error and the rest go on. `--quick` is a smoke test (first seed, at most 2 epochs, 10k generated rows).

Run it alone on the machine, e.g.
    POLARS_MAX_THREADS=2 .venv/bin/python benchmarks/balancers.py --threads 2 --json balancers.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for defaults_sweep.py and synthetic.py as a script

from defaults_sweep import FUNNEL_TASKS, auc, keep, run_arguments, splits, summary, train_and_score  # noqa: E402

from mbtrain.balance import BALANCERS  # noqa: E402
from mbtrain.config import RunConfig, peak_lr  # noqa: E402

BASELINE = "none"
MODEL_NAMES = {"mmoe": "MMoE", "shared-bottom": "shared-bottom"}
TASKS = {
    "adult": ["income_50k", "never_married"],
    "sample funnel": FUNNEL_TASKS,
    "generated funnel": FUNNEL_TASKS,
}
OVERRIDES: dict[str, dict[str, Any]] = {"sample funnel": {"exclude": ["impression_id"]}}
TITLES = {
    "adult": "Adult, seeded 80/20 split: test AUC per balancer",
    "sample funnel": "Sample funnel (sample_data): test AUC on funnel_test.csv per balancer",
    "generated funnel": "Generated funnel (synthetic.py, {rows:,} rows), seeded 80/20 split: test AUC per balancer",
}


def run_one(dataset: str, balance: str, seed: int, train: Path, test: Path, out: Path,
            args: argparse.Namespace, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one balancer on one data set and seed (with `settings` on top: another model, the tasks in funnel
    order); the row of the --json output (with `error` if it failed)."""
    overrides: dict[str, Any] = {**OVERRIDES.get(dataset, {}), "tasks": TASKS[dataset], "balance": balance,
                                 "seed": seed, "threads": args.threads, **(settings or {})}
    if args.quick:
        overrides["epochs"] = min(RunConfig().train.epochs, 2)
    return train_and_score({"dataset": dataset, "balance": balance, "seed": seed}, overrides, train, test, out)


def paired(dataset: str, balance: str, rows: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The main-task AUC difference to the plain sum and the epoch-time ratio, each paired by seed."""
    main = TASKS[dataset][0]

    def find(name: str, seed: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["dataset"] == dataset and r["balance"] == name and r["seed"] == seed),
                    None)

    differences, ratios = [], []
    for seed in seeds:
        mine, base = find(balance, seed), find(BASELINE, seed)
        if auc(mine, main) is not None and auc(base, main) is not None:
            differences.append(auc(mine, main) - auc(base, main))
        if mine and base and "error" not in mine and "error" not in base and base["seconds_per_epoch"] > 0:
            ratios.append(mine["seconds_per_epoch"] / base["seconds_per_epoch"])
    return {"differences": differences, "ratios": ratios}


def table(dataset: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> Table:
    main, auxiliaries = TASKS[dataset][0], TASKS[dataset][1:]
    result = Table(title=TITLES[dataset].format(rows=args.rows), caption=caption(dataset, args))
    result.add_column("balancer")
    result.add_column(f"{main} (main)\nAUC", justify="right")
    for task in auxiliaries:
        result.add_column(f"{task}\nAUC", justify="right")
    result.add_column(f"Δ {main} AUC vs none\n(seeds higher)", justify="right")
    result.add_column("beats\nnone?", justify="center")
    result.add_column("epoch time\n÷ none", justify="right")
    result.add_column("best\nepoch", justify="right")
    for balance in args.balancers:
        runs = [r for r in rows if r["dataset"] == dataset and r["balance"] == balance]
        done = [r for r in runs if "error" not in r]
        cells = [balance + (f" ({len(runs) - len(done)} failed)" if len(done) < len(runs) else "")]
        for task in TASKS[dataset]:
            cells.append(summary([auc(r, task) for r in runs]))
        if balance == BASELINE:
            cells += ["—", "baseline", "1.00×" if done else "—"]
        else:
            pair = paired(dataset, balance, rows, args.seeds)
            differences, ratios = pair["differences"], pair["ratios"]
            if differences:
                mean, higher = statistics.fmean(differences), sum(d > 0 for d in differences)
                cells.append(f"{mean:+.4f} ({higher}/{len(differences)})")
                cells.append("yes" if mean > 0 and 2 * higher >= len(differences) else "no")
            else:
                cells += ["—", "—"]
            cells.append(f"{statistics.median(ratios):.2f}×" if ratios else "—")
        cells.append(summary([r["best_epoch"] for r in done], 1).split(" ±")[0])
        result.add_row(*cells)
    return result


def caption(dataset: str, args: argparse.Namespace) -> str:
    config = RunConfig()
    m, t = config.model, config.train
    epochs = 2 if args.quick else t.epochs
    seeds = ", ".join(str(s) for s in args.seeds)
    size = f"{args.rows:,} generated rows, " if dataset == "generated funnel" else ""
    model = MODEL_NAMES.get(m.model, m.model)
    return (f"{size}{model} {m.experts} experts {m.hidden}, embed {m.embed_dim}, towers {m.tower}, "
            f"batch {t.batch_size}, lr {peak_lr(t):g}, ≤ {epochs} epochs, patience {t.patience} on main-task "
            f"validation AUC (10% hold-out of the training file), best checkpoint on the test part; each balancer "
            f"with its defaults; mean ± std over seeds {seeds}; {args.threads} threads. Δ and epoch time are "
            f"paired with `none` seed by seed (mean Δ; median time ratio); 'beats none' = mean Δ > 0 and higher "
            f"on at least half the seeds.")


def main() -> None:
    parser = run_arguments(__doc__, list(TITLES), seeds=[0, 1, 2, 3, 4], threads=2, rows=50_000, quick_rows=10_000)
    parser.add_argument("--balancers", nargs="+", choices=BALANCERS, default=list(BALANCERS), metavar="BALANCER",
                        help=f"a subset of: {', '.join(BALANCERS)} (none, the baseline, is always run)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rows = args.seeds[:1], min(args.rows, args.quick_rows)
    args.balancers = [BASELINE] + [b for b in dict.fromkeys(args.balancers) if b != BASELINE]

    console = Console(width=150)
    log = Console(stderr=True, width=250)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for dataset, seed, train, test, out in splits(args):
        for balance in args.balancers:
            row = run_one(dataset, balance, seed, train, test, out, args)
            keep(row, rows, args, log, f"{dataset} / seed {seed} / {balance}", TASKS[dataset], started)
    for dataset in args.datasets:
        console.print(table(dataset, rows, args))
    failed = [r for r in rows if "error" in r]
    console.print(f"{len(rows)} runs, {len(failed)} failed, {time.perf_counter() - started:.0f} s wall")
    for row in failed:
        console.print(f"failed: {row['dataset']} / seed {row['seed']} / {row['balance']}: {row['error']}",
                      markup=False, highlight=False)


if __name__ == "__main__":
    main()
