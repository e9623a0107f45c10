"""Which architecture learns the main task best, with and without MetaBalance? `mbtrain sweep`, on each data set
below; this script only writes the data and the grid, and prints the sweep's report (as benchmarks/balancers.py).

The grid: one method per model and balancer, `MODEL-none` (the plain sum) and `MODEL-metabalance`, for
shared-bottom, mmoe, ple, esmm, mmoe-funnel (MMoE with the entire-space funnel, `--funnel`) and aitm (a funnel
model of its own); the baseline is `mmoe-none` (the default model with the plain sum). Every method has one
configuration: the default recipe otherwise (8 experts [64, 32], PLE 2 levels with 1 expert per task, embed 8,
towers [16], batch 1024, the default learning rate, 10 epochs, early stopping with patience 3 on main-task
validation AUC). Per seed the sweep splits the rows into training, validation (10 % of the rest) and test (20 %)
rows; every method of that seed reads the same rows; test rows are scored once, for each method's run. The
report: the main task's test AUC per method, the paired difference to `mmoe-none` with its 95 % t interval over
the seeds, seeds won, the auxiliary tasks' differences, epoch and total time ratios, and a verdict line per method.

Data sets:
- adult: Adult (../shared/data/adult/adult.parquet, 48,842 rows): income_50k (main), never_married. Not a funnel
  (income does not imply marriage or its absence), so the funnel models (esmm, mmoe-funnel, aitm) fail there
  with the funnel-breaking error: the report shows those methods with no test AUC ("—"; verdict: no seed where
  both runs finished) and lists each failed run's error as a warning.
- generated funnel: benchmarks/synthetic.py (--rows rows): tasks click, cart, purchase in that order, so that the
  funnel models see the stages first to last; purchase (rare) is the main task.

Run it alone on the machine (2 fits at a time, the cores shared between them unless --threads gives each fit's):
    .venv/bin/python benchmarks/architectures.py --out bench-architectures
    .venv/bin/python benchmarks/architectures.py --quick                      # 2 seeds, 2 epochs, 10k rows
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the sibling benchmarks as a script

from balancers import common_arguments, sweep_each  # noqa: E402

# (tasks, main task): the funnel's stages first to last, so the funnel models read them in order
TASKS = {"adult": (["income_50k", "never_married"], "income_50k"),
         "generated funnel": (["click", "cart", "purchase"], "purchase")}
MODELS = {"shared-bottom": 'model = "shared-bottom"', "mmoe": 'model = "mmoe"', "ple": 'model = "ple"',
          "esmm": 'model = "esmm"', "mmoe-funnel": 'model = "mmoe"\nfunnel = true', "aitm": 'model = "aitm"'}
BALANCES = ("none", "metabalance")
BASELINE = "mmoe-none"


def grid(tasks: list[str], main: str, seeds: int, quick: bool, threads: int | None) -> str:
    """The sweep's --config: the tasks, seeds, and one [method.MODEL-BALANCE] table per model and balancer."""
    methods = "".join(f'[method.{model}-{balance}]\nbalance = "{balance}"\n{settings}\n'
                      for model, settings in MODELS.items() for balance in BALANCES)
    return (f'tasks = "{",".join(tasks)}"\nmain-task = "{main}"\nseed = {list(range(seeds))}\n'
            + ("epochs = 2\n" if quick else "") + (f"threads = {threads}\n" if threads else "") + methods)


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--datasets", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--threads", type=int, help="torch threads per fit (default: the cores shared by the jobs)")
    args = parser.parse_args()
    sweep_each(args.datasets, lambda dataset, seeds, quick: grid(*TASKS[dataset], seeds, quick, args.threads),
               BASELINE, args)


if __name__ == "__main__":
    main()
