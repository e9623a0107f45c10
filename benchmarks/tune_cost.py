"""What `mbtrain sweep --trials` costs besides its fits, and what a second process sharing its journal buys: figures
from one sitting.

A generated funnel (benchmarks/synthetic.py funnel_log, --rows rows), then `mbtrain sweep --balance none,metabalance
--trials 8 --seeds 3 --threads 1`, in rounds that alternate:
- one process;
- two processes started together on the same --out and the same --storage journal file (one thread each, the
  machine's 2 cores), each taking trials and then seed runs until none is left.
Printed per round: the wall time until every process has ended, the trials each method got and who ran them;
then the two-process wall time over the one-process one (target ≤ 0.65), and the tuning machinery's own time
(sampling, the storage, pruning decisions, claims: sweep.json's tuning_s, and the report's select_and_score_s)
over the fits' own time (target ≤ 5 %), from the one-process rounds. Asserts nothing.

Run it alone on the machine:
    .venv/bin/python benchmarks/tune_cost.py              # 50k rows, 2 rounds, ~10 minutes on 2 cores
    .venv/bin/python benchmarks/tune_cost.py --quick      # 10k rows, 1 round, 2 epochs: a smoke test
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import funnel_log  # noqa: E402

TRIAL = re.compile(r"^trial (\d+)/\d+ of (\S+):", re.M)


def sweep(data: Path, out: Path, processes: int, trials: int, seeds: int, quick: bool) -> tuple[float, list[str]]:
    """Wall seconds until all `processes` sharing `out` have ended, and each one's output."""
    command = [sys.executable, "-m", "mbtrain", "sweep", str(data), "--tasks", "purchase,cart,click",
               "--balance", "none,metabalance", "--trials", str(trials), "--seeds", str(seeds), "--threads", "1",
               "--out", str(out), "--storage", str(out.parent / f"{out.name}.journal"),
               *(["--epochs", "2"] if quick else [])]
    started = time.perf_counter()
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(processes)]
    outputs = [process.communicate()[0] for process in running]
    wall = time.perf_counter() - started
    for process, output in zip(running, outputs, strict=True):
        if process.returncode:
            raise SystemExit(f"a sweep process failed:\n{output}")
    return wall, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="10k rows, 1 round, 2 epochs")
    args = parser.parse_args()
    rows, rounds = (10_000, 1) if args.quick else (args.rows, args.rounds)
    walls: dict[int, list[float]] = {1: [], 2: []}
    shares = []
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "funnel.parquet"
        funnel_log(rows).write_parquet(data)
        print(f"{rows:,} generated rows (funnel_log), none and metabalance, --trials {args.trials}, "
              f"--seeds {args.seeds}, 1 thread per process")
        for round_ in range(rounds):
            for processes in (1, 2):
                out = Path(folder) / f"sweep-{round_}-{processes}"
                wall, outputs = sweep(data, out, processes, args.trials, args.seeds, args.quick)
                walls[processes].append(wall)
                taken = [sorted(TRIAL.findall(output)) for output in outputs]
                every = [trial for mine in taken for trial in mine]
                budget = json.loads((out / "budget.json").read_text())["methods"]
                counts = ", ".join(f"{m} {a['completed']} completed / {a['pruned']} pruned / {a['failed']} failed"
                                   for m, a in budget.items())
                print(f"round {round_ + 1}, {processes} process{'es' if processes > 1 else ''}: {wall:6.1f} s; "
                      f"trials run {len(every)} ({len(set(every))} distinct; per process "
                      f"{', '.join(str(len(mine)) for mine in taken)}); {counts}")
                if processes == 1:
                    timing = json.loads((out / "sweep.json").read_text())["timing"]
                    machinery = timing["tuning_s"] + timing["select_and_score_s"]
                    fits = timing["trial_fits_s"] + sum(timing["run_s"].values())
                    shares.append(machinery / fits)
                    print(f"  machinery {machinery:.2f} s (tuning {timing['tuning_s']:.2f} s, select and score "
                          f"{timing['select_and_score_s']:.2f} s) over the fits' {fits:.1f} s = {machinery / fits:.1%}")
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    print(f"two processes / one: {two:.1f} s / {one:.1f} s = {two / one:.2f} (target ≤ 0.65; medians of {rounds} "
          f"round{'s' if rounds > 1 else ''})")
    print(f"tuning machinery over the fits' own time: {statistics.median(shares):.1%} (target ≤ 5 %)")


if __name__ == "__main__":
    main()
