"""Does loss balancing help when the tasks' scales differ? Issue 25's measurement: `mbtrain sweep` of the plain sum,
the plain sum with tuned task weights, MetaBalance, uncertainty weighting, GradNorm and FAMO, 5 seeds, on logs that
mix binary and regression tasks; this script only writes the data and the grids, and prints the sweep's report.

Methods (each a [method.NAME] table of the grid, the default model and training settings otherwise):
- `none`, the baseline: the plain sum of the task losses. 1 configuration.
- `weighted`: the plain sum with --task-weights tuned on validation, seed by seed, by the sweep's own rule (the
  configuration with the best main-task validation score): the regression task's weight relative to the binary
  tasks' r = 1, 0.1, 0.01 or 0.001, set on the auxiliary side (a regression auxiliary task weighs r; where the
  regression task is the main task, every binary auxiliary task weighs 1/r). r = 1 is `none`; r = 0.001 brings a
  squared error in raw seconds (hundreds) down to a log loss's size. 4 configurations.
- `metabalance`, `uncertainty`, `gradnorm`, `famo`: each at its defaults (as benchmarks/balancers.py runs them),
  1 configuration each.
So `weighted` had 4 chances on validation and every other method 1: the report warns of the unequal budgets, which
favour `weighted`, as tuning the baseline's weights is meant to.

Per seed the sweep splits the rows into training, validation (10 % of the rest) and test (20 %) rows; every method
of the seed reads the same rows; the test rows are scored once, for the run each method chose on validation. The
report: the main task's test metric (AUC for a binary main task; RMSE in the column's own units for a regression
one, the type's default --monitor) per method, the paired difference to `none` with its 95 % t interval over the
seeds, seeds won, every auxiliary task's difference in its own type's metric (AUC or RMSE), time ratios, a verdict
line per method.

Data sets (a "raw" variant trains the regression task on its raw values, --target-transform TASK=none: a squared
error in the column's squared units, hundreds against a log loss's ~0.5, the imbalance the balancers were made for;
otherwise the default log1p, standardised, whose loss is of a log loss's size):
- feed, feed raw: benchmarks/synthetic.py's feed_log (--rows rows; 2,000 users, 500 items): click (binary, main),
  like (binary, null where not clicked: --missing-labels skip), watch (seconds, log-normal, a regression task).
  The main task is a binary one with watch time as an auxiliary task of another scale: where the plain sum of
  unequal losses should hurt the main task, and where a balancer that scales the auxiliary gradients to the main
  task's (MetaBalance) should help.
- feed watch, feed watch raw: the same rows with watch (regression) the main task, click and like auxiliary.
- adult, adult raw: Adult (../shared/data/adult/adult.parquet, 48,842 rows): income_50k (main), never_married
  (benchmarks/balancers.py's Adult tasks) and hours-per-week (hours a week, 1 to 99; a feature there, a regression
  task here, so not a feature).

Run it alone on the machine (2 fits at a time, 1 thread each, by default):
    .venv/bin/python benchmarks/task_types.py --out bench-task-types        # make bench-task-types
    .venv/bin/python benchmarks/task_types.py --quick                       # 2 seeds, 2 epochs, 10k rows
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for synthetic.py and balancers.py as scripts

from balancers import TASKS, common_arguments, sweep_each  # noqa: E402
from synthetic import feed_log  # noqa: E402

BALANCED = ("metabalance", "uncertainty", "gradnorm", "famo")
RATIOS = (1.0, 0.1, 0.01, 0.001)  # the regression task's weight relative to the binary tasks' (`weighted`)


@dataclass
class DataSet:
    tasks: list[str]  # main task first
    regression: str  # the regression task
    reads: str  # the data set whose rows it reads
    raw: bool = False  # --target-transform REGRESSION=none
    settings: dict[str, str] = field(default_factory=dict)


FEED = {"missing-labels": "skip"}
ADULT = [*TASKS["adult"], "hours-per-week"]
DATASETS = {
    "feed": DataSet(["click", "like", "watch"], "watch", "feed", settings=FEED),
    "feed raw": DataSet(["click", "like", "watch"], "watch", "feed", raw=True, settings=FEED),
    "feed watch": DataSet(["watch", "click", "like"], "watch", "feed", settings=FEED),
    "feed watch raw": DataSet(["watch", "click", "like"], "watch", "feed", raw=True, settings=FEED),
    "adult": DataSet(ADULT, "hours-per-week", "adult"),
    "adult raw": DataSet(ADULT, "hours-per-week", "adult", raw=True),
}


def weights(data: DataSet, ratio: float) -> str:
    """--task-weights for a regression-to-binary weight ratio, on the auxiliary tasks."""
    if data.tasks[0] == data.regression:
        return ",".join(f"{task}={1 / ratio:g}" for task in data.tasks[1:])
    return f"{data.regression}={ratio:g}"


def grid(dataset: str, seeds: int, quick: bool) -> str:
    """The sweep's --config: the data set's tasks and types, seeds, a [method.NAME] table per method."""
    data = DATASETS[dataset]
    settings = {**data.settings, "task-type": f"{data.regression}=regression"}
    if data.raw:
        settings["target-transform"] = f"{data.regression}=none"
    tuned = ", ".join(f'"{weights(data, ratio)}"' for ratio in RATIOS)
    return (f'tasks = "{",".join(data.tasks)}"\n' + "".join(f'{key} = "{value}"\n' for key, value in settings.items())
            + f"seed = {list(range(seeds))}\n" + ("epochs = 2\n" if quick else "")
            + '[method.none]\nbalance = "none"\n'
            + f'[method.weighted]\nbalance = "none"\ntask-weights = [{tuned}]\n'
            + "".join(f'[method.{name}]\nbalance = "{name}"\n' for name in BALANCED))


def main() -> None:
    parser = common_arguments(__doc__)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    args = parser.parse_args()
    sweep_each(args.datasets, grid, "none", args, {"feed": feed_log},
               {name: data.reads for name, data in DATASETS.items()})


if __name__ == "__main__":
    main()
