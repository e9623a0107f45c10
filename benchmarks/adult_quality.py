"""Test AUC on the real Adult data (../shared/data/adult), MMoE, with and without MetaBalance.

Seeded 80/20 train/test split of the whole file; mbtrain holds out 10% of the training part for
validation and early stopping; the best checkpoint is scored on the 20% test part. Prints figures,
asserts nothing: run `make bench-adult`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import polars as pl
import torch
from rich.console import Console
from rich.table import Table

from mbtrain.config import RunConfig
from mbtrain.inference import evaluate
from mbtrain.train import fit

TASKS = ["income_50k", "never_married"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--data", type=Path, default=shared / "data/adult/adult.parquet")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    frame = pl.read_parquet(args.data)
    console = Console()
    table = Table(title=f"Adult ({frame.height:,} rows): test AUC, MMoE, 80/20 split")
    for column in ("seed", "balance", "income_50k (main)", "never_married", "best epoch", "s/epoch"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for seed in args.seeds:
            order = torch.randperm(frame.height, generator=torch.Generator().manual_seed(seed)).numpy()
            cut = int(frame.height * 0.8)
            frame[order[:cut]].write_parquet(root / "train.parquet")
            frame[order[cut:]].write_parquet(root / "test.parquet")
            for balance in ("none", "metabalance"):
                config = RunConfig().updated({"tasks": TASKS, "balance": balance, "epochs": args.epochs,
                                              "seed": seed, "threads": args.threads})
                out = root / f"run-{seed}-{balance}"
                fit(config, root / "train.parquet", out, console=Console(quiet=True))
                test = evaluate(out, root / "test.parquet")["tasks"]
                history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
                seconds = sum(row["seconds"] for row in history) / len(history)
                best = json.loads((out / "metrics.json").read_text())["best_epoch"]
                table.add_row(str(seed), balance, f"{test['income_50k']['auc']:.4f}",
                              f"{test['never_married']['auc']:.4f}", str(best), f"{seconds:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
