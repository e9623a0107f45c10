"""Does each loss balancer beat the plain sum of the task losses, and at what cost? `mbtrain sweep`, on each data
set below; this script only writes the data and the grid, and prints the sweep's report.

Equal budgets (`--trials N`, what `make bench-balancers` runs): every method (`--methods`, default every registered
balancer) tuned by Optuna on N trials of its default space (the learning rate, each auxiliary task's weight, its
own settings; docs/sweep.md) on the first seed's validation rows, then its best trial on every seed, against
`none`, which with its weights tuned is the tuned plain sum. Without `--trials`, the grid below.

The grid: every registered balancer at its defaults, and each gradient balancer that works at both levels once
more at `--balance-level representation` (`NAME-representation`; MetaBalance's is `multibalance`); the plain sum
as it is (`none`); and the plain sum with tuned task weights (`tuned-sum`, the baseline: every auxiliary task's
weight 1, 0.3 or 0.1, chosen on validation seed by seed, as the multi-task benchmark papers ask of the
baseline). The default model (MMoE, 8
experts [64, 32], embed 8, towers [16], batch 1024, the default learning rate, 10 epochs, early stopping with
patience 3 on main-task validation AUC). Per seed the sweep splits the rows into training, validation (10 % of the
rest) and test (20 %) rows; every method of that seed reads the same rows; test rows are scored once, for the
run each method chose on validation. The report: the main task's test AUC per method, the paired difference to
`none` with its 95 % t interval over the seeds, seeds won, the auxiliary tasks' differences, time ratios, and a
verdict line per method. Note that `tuned-sum` had three configurations and every other method one: the report
says so (unequal budgets favour it, the baseline here).

Data sets:
- adult: Adult (../shared/data/adult/adult.parquet, 48,842 rows): income_50k (main), never_married.
- generated funnel: benchmarks/synthetic.py's funnel_log (--rows rows): purchase (rare, main), cart, click.

Run it alone on the machine (2 fits at a time, 1 thread each, by default):
    .venv/bin/python benchmarks/balancers.py --trials 8 --rows 200000 --out bench-balancers  # make bench-balancers
    .venv/bin/python benchmarks/balancers.py --out bench-balancers-grid        # the grid
    .venv/bin/python benchmarks/balancers.py --quick --trials 3               # 2 seeds, 2 epochs, 10k rows
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for synthetic.py as a script

from synthetic import funnel_log, impressions  # noqa: E402

from mbtrain.balance import BALANCERS  # noqa: E402
from mbtrain.balance.per_task import PARAMETERS, REPRESENTATION  # noqa: E402

ADULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "adult" / "adult.parquet"
TASKS = {"adult": ["income_50k", "never_married"], "generated funnel": ["purchase", "cart", "click"]}
AUXILIARY_WEIGHTS = (1.0, 0.3, 0.1)


def grid(tasks: list[str], seeds: int, quick: bool) -> str:
    """The sweep's --config: methods, seeds, and the tuned plain sum's weights."""
    weights = ", ".join('"' + ",".join(f"{task}={weight}" for task in tasks[1:]) + '"' for weight in AUXILIARY_WEIGHTS)
    methods = ", ".join(f'"{name}"' for name in BALANCERS)
    representation = "".join(f'[method.{name}-representation]\nbalance = "{name}"\nbalance-level = "representation"\n'
                             for name, kind in BALANCERS.items()
                             if {PARAMETERS, REPRESENTATION} <= set(kind.levels) and name != "metabalance")
    return (f'tasks = "{",".join(tasks)}"\nbalance = [{methods}]\nseed = {list(range(seeds))}\n'
            + ("epochs = 2\n" if quick else "")
            + f'[method.tuned-sum]\nbalance = "none"\ntask-weights = [{weights}]\n' + representation)


def sweep_each(datasets: list[str], grid_of: Callable[[str, int, bool], str], baseline: str,
               args: argparse.Namespace, generators: dict[str, Callable[[int], pl.DataFrame]] | None = None,
               reads: dict[str, str] | None = None, flags: tuple[str, ...] = ()) -> None:
    """Per data set: the data (Adult, or generated once under --out: by `generators[dataset](rows)`, by default
    the generated funnel of synthetic.impressions), its grid (`grid_of(dataset, seeds, quick)`), and `mbtrain
    sweep` on them against `baseline` (with `flags`), which prints the report. `reads` maps a data set that is a
    variant of another (other settings on the same rows) to the one whose data it reads."""
    seeds, rows = (2, 10_000) if args.quick else (args.seeds, args.rows)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for dataset in datasets:
            name, source = dataset.replace(" ", "-"), (reads or {}).get(dataset, dataset)
            if source == "adult":
                data = args.data
            else:
                data = root / f"{source.replace(' ', '-')}.parquet"
                if not data.is_file():
                    (generators or {}).get(source, impressions)(rows).write_parquet(data)
            config = root / f"{name}.toml"
            config.write_text(grid_of(dataset, seeds, args.quick))
            print(f"\n== {dataset}: {data}", flush=True)
            subprocess.run([sys.executable, "-m", "mbtrain", "sweep", str(data), "--config", str(config),
                            "--baseline", baseline, "--jobs", str(args.jobs), "--out", str(root / name), *flags],
                           check=True)


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The options both sweep benchmarks take."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the generated funnel")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ADULT, help="the Adult parquet file")
    parser.add_argument("--out", type=Path, help="keep the sweeps here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 2 epochs, 10k generated rows")
    return parser


def equal_budgets(tasks: list[str], methods: list[str], seeds: int, quick: bool) -> str:
    """The sweep's --config under --trials: the methods and seeds; each method's space is its default one."""
    names = ", ".join(f'"{name}"' for name in methods)
    return (f'tasks = "{",".join(tasks)}"\nbalance = [{names}]\nseed = {list(range(seeds))}\n'
            + ("epochs = 2\n" if quick else ""))


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--datasets", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--trials", type=int, help="equal budgets: each method tuned on N Optuna trials")
    parser.add_argument("--methods", nargs="+", choices=list(BALANCERS), default=list(BALANCERS),
                        help="the methods compared under --trials (none first: the baseline)")
    args = parser.parse_args()
    generators = {"generated funnel": funnel_log}
    if args.trials is None:
        sweep_each(args.datasets, lambda dataset, seeds, quick: grid(TASKS[dataset], seeds, quick), "tuned-sum",
                   args, generators)
        return
    methods = ["none", *(name for name in args.methods if name != "none")]
    sweep_each(args.datasets, lambda dataset, seeds, quick: equal_budgets(TASKS[dataset], methods, seeds, quick),
               "none", args, generators, flags=("--trials", str(args.trials)))


if __name__ == "__main__":
    main()
