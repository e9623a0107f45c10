"""Which architecture learns the main task best, with and without MetaBalance? By measurement.

Shared-bottom, MMoE, PLE, ESMM and MMoE with the entire-space funnel (`--funnel`), each with the plain sum
(`none`) and with MetaBalance, train with the RunConfig defaults otherwise (8 experts [64, 32], PLE 2 levels with
1 expert per task, batch 1024, the default learning rate, ≤ 10 epochs, early stopping with patience 3 on
main-task validation AUC from a 10% hold-out of the training file); the best checkpoint is scored on a test part
it never saw. Data sets (as benchmarks/balancers.py's, seeded 80/20 splits):

- Adult (../shared/data/adult): income_50k (main) and never_married. Not a funnel (income does not imply
  marriage or its absence), so the funnel models refuse it with the funnel-breaking error, which the table
  shows.
- the generated funnel (benchmarks/synthetic.py, `--rows` rows from each seed): click → cart → purchase
  (main), given in that order so that the funnel models see the stages first to last.

Within each data set and seed every variant runs in turn (interleaved). Prints one table per data set: the
main-task test AUC (mean ± std over seeds), the auxiliary tasks' test AUC, each variant's main-task AUC
difference to MMoE with the plain sum paired by seed (the default model), and its epoch time over that one's.
Asserts nothing; a failed run is recorded with its error. `--quick`: first seed, ≤ 2 epochs, 10k rows.

Run it alone on the machine, e.g.
    POLARS_MAX_THREADS=2 .venv/bin/python benchmarks/architectures.py --threads 2 --json architectures.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the sibling benchmarks as a script

from balancers import run_one  # noqa: E402
from defaults_sweep import auc, keep, run_arguments, splits, summary  # noqa: E402

TASKS = {"adult": ["income_50k", "never_married"], "generated funnel": ["click", "cart", "purchase"]}
MAIN = {"adult": "income_50k", "generated funnel": "purchase"}
MODELS: dict[str, dict[str, Any]] = {
    "shared-bottom": {"model": "shared-bottom"},
    "mmoe": {"model": "mmoe"},
    "ple": {"model": "ple"},
    "esmm": {"model": "esmm"},
    "mmoe --funnel": {"model": "mmoe", "funnel": True},
}
BALANCES = ["none", "metabalance"]
BASELINE = ("mmoe", "none")
TITLES = {"adult": "Adult, seeded 80/20 split: test AUC per model and balancer",
          "generated funnel": "Generated funnel (synthetic.py, {rows:,} rows), seeded 80/20 split: test AUC per "
                              "model and balancer"}


def table(dataset: str, rows: list[dict[str, Any]], args: Any) -> Table:
    tasks, main = TASKS[dataset], MAIN[dataset]
    order = [main] + [task for task in tasks if task != main]
    result = Table(title=TITLES[dataset].format(rows=args.rows),
                   caption=f"mean ± std over seeds {', '.join(map(str, args.seeds))}; Δ and time paired seed by "
                           f"seed with MMoE + none (mean Δ, seeds higher; median time ratio); {args.threads} "
                           "threads")
    for heading in ("model", "balance", f"{main} (main) AUC", *(f"{t} AUC" for t in order[1:]),
                    "Δ main vs mmoe/none", "epoch time ÷ mmoe/none", "best epoch"):
        result.add_column(heading, justify="left" if heading in ("model", "balance") else "right")

    def find(model: str, balance: str, seed: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["dataset"] == dataset and r["variant"] == model and r["balance"] == balance
                     and r["seed"] == seed), None)

    for model in MODELS:
        for balance in BALANCES:
            runs = [r for r in rows if r["dataset"] == dataset and r["variant"] == model and r["balance"] == balance]
            done = [r for r in runs if "error" not in r]
            if runs and not done:
                reason = runs[0]["error"].split(": ", 1)[-1]
                why = "labels are not a funnel" if "break the funnel" in reason else reason[:60]
                result.add_row(model, balance, f"— ({why})", *["—"] * (len(order) + 2))
                continue
            differences, ratios = [], []
            for seed in args.seeds:
                mine, base = find(model, balance, seed), find(*BASELINE, seed)
                if auc(mine, main) is not None and auc(base, main) is not None:
                    differences.append(auc(mine, main) - auc(base, main))
                if mine and base and "error" not in mine and "error" not in base:
                    ratios.append(mine["seconds_per_epoch"] / base["seconds_per_epoch"])
            delta = ("—" if (model, balance) == BASELINE or not differences else
                     f"{statistics.fmean(differences):+.4f} ({sum(d > 0 for d in differences)}/{len(differences)})")
            result.add_row(model, balance, *(summary([auc(r, task) for r in runs]) for task in order), delta,
                           f"{statistics.median(ratios):.2f}×" if ratios else "—",
                           summary([r["best_epoch"] for r in done], 1).split(" ±")[0])
    return result


def main() -> None:
    args = run_arguments(__doc__, list(TITLES), seeds=[0, 1, 2], threads=2, rows=50_000,
                         quick_rows=10_000).parse_args()
    if args.quick:
        args.seeds, args.rows = args.seeds[:1], min(args.rows, args.quick_rows)
    console, log = Console(width=170), Console(stderr=True, width=250)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for dataset, seed, train, test, out in splits(args):
        for model, settings in MODELS.items():
            for balance in BALANCES:
                chosen = {**settings, "tasks": TASKS[dataset], "main_task": MAIN[dataset]}
                row = run_one(dataset, balance, seed, train, test, out, args, chosen)
                row["variant"] = model
                keep(row, rows, args, log, f"{dataset} / seed {seed} / {model} / {balance}", TASKS[dataset], started)
    for dataset in args.datasets:
        console.print(table(dataset, rows, args))
    console.print(f"{len(rows)} runs, {sum('error' in r for r in rows)} failed, "
                  f"{time.perf_counter() - started:.0f} s wall")


if __name__ == "__main__":
    main()
