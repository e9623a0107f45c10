"""What `mbtrain sweep` costs besides its runs, and what --jobs 2 buys on a 2-core machine: figures from one run.

A generated click → cart → purchase funnel (benchmarks/synthetic.py, --rows rows), then
`mbtrain sweep --balance none,metabalance,famo,gradnorm --seeds 5 --jobs 2 --threads 1` in a fresh process,
timed from outside. Printed: the sweep's wall time; the sum of its runs' wall times (each run timed in its
worker, one thread each); their ratio (target ≤ 0.65 with 2 jobs on 2 cores); and the sweep's own overhead,
everything but the runs (the process start, reading the grid, writing the splits, selecting, scoring the test
rows, the report, the picture), as a share of the wall time (target ≤ 5 %). Asserts nothing.

Run it alone on the machine:
    .venv/bin/python benchmarks/sweep_cost.py            # 200k rows, ~10 minutes on 2 cores
    .venv/bin/python benchmarks/sweep_cost.py --quick    # 20k rows, 2 seeds, 2 epochs: a smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TASKS, impressions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", default="none,metabalance,famo,gradnorm")
    parser.add_argument("--quick", action="store_true", help="20k rows, 2 seeds, at most 2 epochs")
    args = parser.parse_args()
    rows, seeds = (20_000, 2) if args.quick else (args.rows, args.seeds)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "funnel.parquet"
        impressions(rows).write_parquet(data)
        out = Path(folder) / "sweep"
        command = [sys.executable, "-m", "mbtrain", "sweep", str(data), "--funnel",
                   "--tasks", ",".join(reversed(TASKS)), "--main-task", TASKS[0],
                   "--balance", args.methods, "--seeds", str(seeds), "--jobs", str(args.jobs), "--threads", "1",
                   "--out", str(out), *(["--epochs", "2"] if args.quick else [])]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        timing = json.loads((out / "sweep.json").read_text())["timing"]
    runs = sum(timing["run_s"].values())
    overhead = wall - timing["runs_s"]
    print(f"{rows:,} generated rows, {args.methods}, {seeds} seeds, {len(timing['run_s'])} runs, "
          f"--jobs {args.jobs}, 1 thread each")
    print(f"sweep wall time          {wall:8.1f} s")
    print(f"sum of the runs' times   {runs:8.1f} s   wall / sum = {wall / runs:.2f}  (target ≤ 0.65 with 2 jobs)")
    prepare, score = timing["prepare_s"], timing["select_and_score_s"]
    print(f"overhead besides the runs {overhead:7.1f} s   = {overhead / wall:.1%} of the wall time (target ≤ 5 %): "
          f"prepare {prepare:.1f} s, select and score the test rows {score:.1f} s, the rest (process start, "
          f"report, picture) {overhead - prepare - score:.1f} s")


if __name__ == "__main__":
    main()
