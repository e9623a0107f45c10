"""What an id column's vocabulary costs a training step: rows/s and peak RSS against the number of distinct ids,
per table optimizer, for 1 and 2 processes, for the plain sum and MetaBalance. Figures printed in one run.

For each `--values` a generated log (benchmarks/synthetic.py's id_log: `--rows` rows, an `ad_id` column with
that many distinct ids beside two small categoricals and a number; click and purchase) is written once; then
`mbtrain fit` runs once per variant in a fresh process (`--min-frequency 1`, so every id keeps its own row; MMoE
defaults; one epoch; `--batch-size` rows per process): one process with 2 threads, or 2 processes under torchrun
with 1 thread each. Printed per variant: the table's rows and bytes (with the optimizer's state), training rows/s
(history.jsonl: the steps alone), fit's wall time and peak RSS (the largest process's), and each ratio to the
same variant at the smallest vocabulary.

Run it alone on the machine, e.g. `.venv/bin/python benchmarks/vocab.py` (the issue's grid: 3M rows, 10^4 and
2.9M ids), or `--rows 12000000 --values 10000000 --optimizers lazy-adam --procs 1` for 10^7 ids.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import id_log  # noqa: E402

from mbtrain.optim import TABLE_OPTIMIZERS, state_floats_per_row  # noqa: E402

EMBED_DIM = 8  # ModelConfig's default, which these runs keep


def fit(data: Path, out: Path, optimizer: str, balance: str, procs: int, args: argparse.Namespace) -> dict:
    launcher = [sys.executable, "-m", "mbtrain"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m",
         "mbtrain"]
    command = [*launcher, "fit", str(data), "--tasks", "purchase,click", "--categorical", "ad_id,device,region",
               "--min-frequency", "1", "--epochs", "1", "--batch-size", str(args.batch_size), "--threads",
               str(max(1, 2 // procs)), "--balance", balance, "--table-optimizer", optimizer, "--out", str(out),
               "--overwrite"]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a full pipe would block fit
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)  # ru_maxrss: the largest of the process and its children
        wall = time.perf_counter() - started
        if status:
            errors.seek(0)
            raise SystemExit(f"fit failed: {errors.read().decode()[-2000:]}")
    history = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    model = torch.load(out / "checkpoints" / "last.pt", weights_only=True, mmap=True)["model"]
    table = next(tensor for name, tensor in model.items() if name.endswith("embedding.table.weight"))
    return {"rows_per_second": history["rows_per_second"], "wall": wall, "peak_gb": usage.ru_maxrss / 2**20,
            "auc": history["valid"]["click"]["auc"], "table_rows": table.shape[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--values", type=int, nargs="+", default=[10_000, 2_900_000])
    parser.add_argument("--optimizers", nargs="+", default=list(TABLE_OPTIMIZERS), choices=TABLE_OPTIMIZERS)
    parser.add_argument("--balance", nargs="+", default=["none", "metabalance"])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    console = Console(width=160)
    results: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for values in args.values:
            data = Path(folder) / f"ids-{values}.parquet"
            id_log(args.rows, values, seed=7).write_parquet(data, row_group_size=1_000_000)
            for optimizer in args.optimizers:
                for balance in args.balance:
                    for procs in args.procs:
                        key = (values, optimizer, balance, procs)
                        results[key] = fit(data, Path(folder) / "run", optimizer, balance, procs, args)
                        console.print(f"{key}: {results[key]['rows_per_second']:,.0f} rows/s", highlight=False)
            data.unlink()
    table = Table(title=f"fit, 1 epoch of {args.rows:,} rows, batch {args.batch_size} per process, MMoE defaults, "
                        "--min-frequency 1")
    for heading in ("distinct ids", "table optimizer", "balance", "procs", "table MB (+ state)", "train rows/s",
                    f"× at {min(args.values):,}", "× 1 proc", "wall s", "peak RSS GB", "valid AUC click"):
        table.add_column(heading, justify="right")
    for (values, optimizer, balance, procs), r in results.items():
        rows = r["table_rows"]
        table_mb = rows * EMBED_DIM * 4 / 2**20
        state_mb = rows * state_floats_per_row(optimizer, EMBED_DIM) * 4 / 2**20
        small = results.get((min(args.values), optimizer, balance, procs))
        single = results.get((values, optimizer, balance, 1))
        table.add_row(f"{values:,}", optimizer, balance, str(procs), f"{table_mb:,.1f} (+ {state_mb:,.1f})",
                      f"{r['rows_per_second']:,.0f}",
                      f"{r['rows_per_second'] / small['rows_per_second']:.2f}" if small else "",
                      f"{r['rows_per_second'] / single['rows_per_second']:.2f}" if single else "",
                      f"{r['wall']:.0f}", f"{r['peak_gb']:.2f}", f"{r['auc']:.4f}")
    console.print(table)


if __name__ == "__main__":
    main()
