"""What mid-epoch checkpoints cost a long pass (issue 26): one epoch of `mbtrain fit` on a generated log of
`--rows` rows with an id column of `--values` distinct ids (benchmarks/synthetic.py's id_log; `--min-frequency 1`,
so the embedding table and its optimizer state are what a real log's checkpoint carries), with and without
`--checkpoint-every`, runs alternating in fresh processes.

Printed per interval: checkpoints written, their mean write time (each `checkpoint:` line's, the write alone),
the fit's training seconds (metrics.json: the steps and the epoch's validation; median over `--rounds`), its ratio
to the run without mid-epoch checkpoints (run in the same rounds), and the writes' share of that time. Below, the
share the mean write would take at each duration interval: what the docs quote for the suggested `15m`.

Run it alone on the machine: `.venv/bin/python benchmarks/checkpoint_cost.py` (= `make bench-checkpoints`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import id_log  # noqa: E402

WRITTEN = re.compile(r"^checkpoint: epoch \d+, step [\d,]+/[\d,]+ in .* \(([\d.]+)s\)$", re.MULTILINE)


def fit(data: Path, out: Path, every: str | None, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "mbtrain", "fit", str(data), "--tasks", "purchase,click", "--categorical",
               "ad_id,device,region", "--min-frequency", "1", "--epochs", "1", "--batch-size", str(args.batch_size),
               "--threads", "2", "--out", str(out), "--overwrite", *(["--checkpoint-every", every] if every else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"fit failed: {result.stderr[-2000:]}")
    writes = [float(seconds) for seconds in WRITTEN.findall(result.stdout)]
    metrics = json.loads((out / "metrics.json").read_text())
    size = (out / "checkpoints" / "last.pt").stat().st_size
    return {"seconds": metrics["seconds"], "writes": writes, "size": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--values", type=int, default=300_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--every", nargs="+", default=["100", "25"], help="--checkpoint-every values to measure")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    console = Console(width=160)
    variants: list[str | None] = [None, *args.every]
    runs: dict[str | None, list[dict]] = {every: [] for every in variants}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "ids.parquet"
        id_log(args.rows, args.values, seed=7).write_parquet(data, row_group_size=100_000)
        for round_ in range(args.rounds):
            for every in variants:
                runs[every].append(fit(data, Path(folder) / "run", every, args))
                console.print(f"round {round_ + 1}, --checkpoint-every {every}: {runs[every][-1]['seconds']:.1f}s",
                              highlight=False)
    base = statistics.median(run["seconds"] for run in runs[None])
    size = runs[None][0]["size"] / 2**20
    table = Table(title=f"fit, 1 epoch of {args.rows:,} rows ({args.values:,} ids, --min-frequency 1), batch "
                        f"{args.batch_size}, 2 threads; last.pt {size:,.1f} MB; medians over {args.rounds} "
                        "alternating rounds")
    for heading in ("--checkpoint-every", "checkpoints", "mean write s", "fit s", "× none", "writes' share"):
        table.add_column(heading, justify="right")
    all_writes = []
    for every, results in runs.items():
        seconds = statistics.median(run["seconds"] for run in results)
        writes = [w for run in results for w in run["writes"]]
        all_writes += writes
        share = sum(writes) / sum(run["seconds"] for run in results)
        table.add_row(every or "(epoch end only)", f"{len(writes) / len(results):.0f}",
                      f"{statistics.fmean(writes):.3f}" if writes else "", f"{seconds:.1f}", f"{seconds / base:.3f}",
                      f"{share:.2%}")
    console.print(table)
    if all_writes:
        write = statistics.median(all_writes)
        console.print(f"median write {write:.3f}s; its share of training at a duration interval: " + ", ".join(
            f"{label} {write / seconds:.3%}" for label, seconds in (("1m", 60), ("5m", 300), ("15m", 900))),
            highlight=False)


if __name__ == "__main__":
    main()
