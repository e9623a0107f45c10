"""Which --table-optimizer to ship as the default, by measurement: `mbtrain sweep` with each table optimizer as a
method (the plain sum, every other setting at its default), 5 seeds, on each data set below; this script only
writes the data and the grid, and prints the sweep's report. The baseline is `adam`, the dense Adam every run
used before table optimizers existed; each method has one configuration (equal budgets), and the test rows of
each seed are scored once, for the run chosen on validation.

Data sets:
- adult: Adult (../shared/data/adult/adult.parquet, 48,842 rows): income_50k (main), never_married. Small
  categorical columns: every row of the table is touched nearly every step.
- generated funnel: benchmarks/synthetic.py (--rows rows): purchase (rare, main), cart, click; 20,000 users and
  5,000 items.
- generated ids: the same funnel, --id-rows rows, with --users users and --items items (ids with few rows
  each): the sparse case, where a lazy optimizer's untouched rows and dense Adam's stale moments differ most.

Run it alone on the machine (2 fits at a time, 1 thread each, by default):
    .venv/bin/python benchmarks/table_optimizers.py --out bench-table-optimizers
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for synthetic.py and balancers.py as scripts

from balancers import TASKS, common_arguments, sweep_each  # noqa: E402
from synthetic import impressions  # noqa: E402

from mbtrain.optim import ADAM, TABLE_OPTIMIZERS  # noqa: E402

DATASETS = {**TASKS, "generated ids": TASKS["generated funnel"]}


def grid(tasks: list[str], seeds: int, quick: bool) -> str:
    """The sweep's --config: one method per table optimizer, the plain sum, seeds."""
    methods = "".join(f'[method.{name}]\nbalance = "none"\ntable-optimizer = "{name}"\n' for name in TABLE_OPTIMIZERS)
    return (f'tasks = "{",".join(tasks)}"\nseed = {list(range(seeds))}\n' + ("epochs = 2\n" if quick else "")
            + methods)


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--id-rows", type=int, default=200_000, help="rows of the generated ids' funnel")
    parser.add_argument("--users", type=int, default=50_000, help="users of the generated ids' funnel")
    parser.add_argument("--items", type=int, default=20_000, help="items of the generated ids' funnel")
    args = parser.parse_args()
    rows = 10_000 if args.quick else args.id_rows
    generators = {"generated ids": lambda _: impressions(rows, users=args.users, items=args.items)}
    sweep_each(args.datasets, lambda dataset, seeds, quick: grid(DATASETS[dataset], seeds, quick), ADAM, args,
               generators)


if __name__ == "__main__":
    main()
