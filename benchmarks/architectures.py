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
  with the funnel-breaking error: the report shows those methods with no test AUC ("—", no verdict: "no
  interval") and lists each failed run's error as a warning.
- generated funnel: benchmarks/synthetic.py (--rows rows): tasks click, cart, purchase in that order, so that the
  funnel models see the stages first to last; purchase (rare) is the main task.

Run it alone on the machine (2 fits at a time, the cores shared between them unless --threads gives each fit's):
    .venv/bin/python benchmarks/architectures.py --out bench-architectures
    .venv/bin/python benchmarks/architectures.py --quick                      # 2 seeds, 2 epochs, 10k rows
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the sibling benchmarks as a script

from balancers import ADULT  # noqa: E402
from synthetic import impressions  # noqa: E402

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the generated funnel")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads per fit (default: the cores shared by the jobs)")
    parser.add_argument("--data", type=Path, default=ADULT, help="the Adult parquet file")
    parser.add_argument("--out", type=Path, help="keep the sweeps here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 2 epochs, 10k generated rows")
    args = parser.parse_args()
    seeds, rows = (2, 10_000) if args.quick else (args.seeds, args.rows)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for dataset in args.datasets:
            name = dataset.replace(" ", "-")
            if dataset == "adult":
                data = args.data
            else:
                data = root / f"{name}.parquet"
                if not data.is_file():
                    impressions(rows).write_parquet(data)
            config = root / f"{name}.toml"
            config.write_text(grid(*TASKS[dataset], seeds, args.quick, args.threads))
            print(f"\n== {dataset}: {data}", flush=True)
            subprocess.run([sys.executable, "-m", "mbtrain", "sweep", str(data), "--config", str(config),
                            "--baseline", BASELINE, "--jobs", str(args.jobs), "--out", str(root / name)],
                           check=True)


if __name__ == "__main__":
    main()
