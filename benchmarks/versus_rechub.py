"""mbtrain against torch-rechub 0.0.3 on Adult, same split and sizes, in one run (`make bench`).

Both train MMoE (8 experts [64, 32], embed 8, towers [16], batch 1024, Adam 1e-3, 2 threads) on the same
train / validation / test rows (benchmarks/rechub_reference.py's adult_split), with and without MetaBalance,
for the same number of epochs; rounds are interleaved so machine noise hits both alike. Seconds per epoch
are training plus validation for both. Test AUC is that of the epoch with the best main-task validation AUC.
Needs the benchmark environment (.venv-bench, see rechub_reference.py); prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import polars as pl
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rechub_reference import ADULT_CATEGORICAL, ADULT_NUMERIC, ADULT_TASKS, adult_split, run_reference  # noqa: E402

from mbtrain.config import RunConfig  # noqa: E402
from mbtrain.inference import evaluate  # noqa: E402
from mbtrain.train import fit  # noqa: E402


def run_mbtrain(root: Path, balance: str, epochs: int, threads: int) -> dict:
    config = RunConfig().updated({"tasks": ADULT_TASKS, "balance": balance, "epochs": epochs, "patience": 0,
                                  "threads": threads, "valid": str(root / "valid.parquet")})
    out = root / f"mbtrain-{balance}"
    fit(config, root / "train.parquet", out, overwrite=True,
        console=Console(quiet=True))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    test = evaluate(out, root / "test.parquet")["tasks"]
    return {"epoch_seconds": [row["seconds"] for row in history],
            "test_auc": {task: test[task]["auc"] for task in ADULT_TASKS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--data", type=Path, default=shared / "data/adult/adult.parquet")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, valid, test = adult_split(pl.read_parquet(args.data), args.seed)
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, frame in (("train", train), ("valid", valid), ("test", test)):
            frame.write_parquet(root / f"{name}.parquet")
        for _ in range(args.rounds):
            for balance in ("none", "metabalance"):
                results.setdefault(("mbtrain", balance), []).append(run_mbtrain(root, balance, args.epochs,
                                                                                args.threads))
                results.setdefault(("torch-rechub", balance), []).append(run_reference(
                    train, valid, test, ADULT_CATEGORICAL, ADULT_NUMERIC, ADULT_TASKS, balance=balance,
                    epochs=args.epochs, seed=args.seed, threads=args.threads))
    table = Table(title=f"Adult: {train.height:,} train / {valid.height:,} valid / {test.height:,} test rows, "
                        f"MMoE, {args.epochs} epochs × {args.rounds} interleaved rounds, {args.threads} threads")
    for column in ("library", "balance", "s/epoch (median)", "mbtrain / torch-rechub", "test AUC income_50k",
                   "test AUC never_married"):
        table.add_column(column, justify="right")
    median = {key: statistics.median(s for run in runs for s in run["epoch_seconds"]) for key, runs in results.items()}
    for (library, balance), runs in results.items():
        ratio = median[("mbtrain", balance)] / median[("torch-rechub", balance)] if library == "mbtrain" else None
        auc = runs[-1]["test_auc"]
        table.add_row(library, balance, f"{median[(library, balance)]:.3f}", f"{ratio:.2f}" if ratio else "",
                      f"{auc['income_50k']:.4f}", f"{auc['never_married']:.4f}")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
