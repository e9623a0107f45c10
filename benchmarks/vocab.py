"""What a huge id column costs `fit`, and what --max-vocab saves: figures printed in one run.

A generated impression log (benchmarks/synthetic.py, `--rows` rows) gets an `ad_id` column with `--values`
distinct ids (each at least once, the rest drawn from a heavy head), whose embedding carries part of the click
signal. `mbtrain fit` then runs once per variant in a fresh process (`--min-frequency 1`, so that every id
seen is kept unless --max-vocab caps it; one epoch, `--batch-size`): without a cap and with each of
`--caps`. Printed per variant: the embedding table's rows, fit's wall time and peak RSS (the process's
own), training rows/s, and validation AUC.

Run it alone on the machine, e.g. `.venv/bin/python benchmarks/vocab.py`.
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

import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import impressions  # noqa: E402


def generate(rows: int, values: int, path: Path) -> None:
    rng = np.random.default_rng(7)
    frame = impressions(rows, seed=7)
    ids = np.concatenate([rng.permutation(values), rng.zipf(1.3, rows - values) % values])[rng.permutation(rows)]
    effect = rng.normal(0, 1, values)[ids]  # the ids' own click propensity
    click = rng.random(rows) < 1 / (1 + np.exp(-(-1.5 + effect)))
    frame = frame.with_columns(pl.Series("ad_id", ids), pl.Series("click", click.astype(np.int8)))
    frame.with_columns(pl.col("cart") * pl.col("click"), pl.col("purchase") * pl.col("click")) \
        .write_parquet(path, row_group_size=1_000_000)


def fit(data: Path, out: Path, cap: int | None, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "mbtrain", "fit", str(data), "--tasks", "click,purchase", "--min-frequency",
               "1", "--epochs", "1", "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--exclude", "cart", "--out", str(out), "--overwrite"]
    command += ["--max-vocab", str(cap)] if cap else []
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: a full pipe would block fit
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        if status:
            errors.seek(0)
            raise SystemExit(f"fit failed: {errors.read().decode()}")
    history = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    spec = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["spec"]
    table_rows = sum(len(column["values"]) + 1 for column in spec["categorical"])
    return {"cap": cap, "table_rows": table_rows, "wall": wall, "peak_gb": usage.ru_maxrss / 2**20,
            "rows_per_second": history["rows_per_second"],
            "auc": {task: history["valid"][task]["auc"] for task in ("click", "purchase")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--values", type=int, default=5_000_000)
    parser.add_argument("--caps", type=int, nargs="*", default=[1_000_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "ads.parquet"
        started = time.perf_counter()
        generate(args.rows, args.values, data)
        console.print(f"{args.rows:,} rows, ad_id with {args.values:,} values, generated in "
                      f"{time.perf_counter() - started:.0f} s")
        results = [fit(data, Path(folder) / f"run-{cap}", cap, args) for cap in [None, *args.caps]]
    table = Table(title=f"fit, 1 epoch of {args.rows:,} rows, batch {args.batch_size}, {args.threads} threads, "
                        "--min-frequency 1")
    for heading in ("--max-vocab", "table rows", "fit wall s", "peak RSS GB", "train rows/s", "valid AUC click",
                    "valid AUC purchase"):
        table.add_column(heading, justify="right")
    for r in results:
        table.add_row(f"{r['cap']:,}" if r["cap"] else "none", f"{r['table_rows']:,}", f"{r['wall']:.0f}",
                      f"{r['peak_gb']:.2f}", f"{r['rows_per_second']:,.0f}", f"{r['auc']['click']:.4f}",
                      f"{r['auc']['purchase']:.4f}")
    console.print(table)


if __name__ == "__main__":
    main()
