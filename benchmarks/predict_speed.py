"""Predict throughput from a run, its TorchScript export and its ONNX export: figures printed in one run.

MMoE (the defaults) trains one epoch on `--train-rows` generated impressions (benchmarks/synthetic.py); the run
is exported both ways; then `--rows` other rows are scored by each, in turns (`--rounds`, median): `mbtrain
predict` end to end (read the Parquet file, encode, score, in 65,536-row chunks) and the scoring alone on the
already encoded rows. Needs the mbtrain[onnx] extra. Run it alone on the machine, e.g.
    .venv/bin/python benchmarks/predict_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TASKS, impressions  # noqa: E402

from mbtrain.config import RunConfig  # noqa: E402
from mbtrain.data.stream import read_files  # noqa: E402
from mbtrain.export import export  # noqa: E402
from mbtrain.inference import load_scorer, predict  # noqa: E402
from mbtrain.models.scoring import predict_rows  # noqa: E402
from mbtrain.train import fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--train-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        impressions(args.train_rows, seed=1).write_parquet(root / "train.parquet")
        impressions(args.rows, seed=2).write_parquet(root / "score.parquet")
        config = RunConfig().updated({"tasks": TASKS, "epochs": 1, "threads": args.threads})
        fit(config, root / "train.parquet", root / "run", console=Console(quiet=True))
        export(root / "run", root / "model.pt")
        export(root / "run", root / "model.onnx", "onnx")
        sources = {"run (eager PyTorch)": root / "run", "TorchScript": root / "model.pt", "ONNX (onnxruntime)":
                   root / "model.onnx"}
        scorers = {name: load_scorer(path) for name, path in sources.items()}
        spec = next(iter(scorers.values()))[1]
        encoded = spec.encoders.encode(read_files([root / "score.parquet"]), "score.parquet")
        end_to_end: dict[str, list[float]] = {name: [] for name in sources}
        scoring: dict[str, list[float]] = {name: [] for name in sources}
        for _ in range(args.rounds):
            for name, path in sources.items():
                started = time.perf_counter()
                predict(path, root / "score.parquet", [])
                end_to_end[name].append(args.rows / (time.perf_counter() - started))
                started = time.perf_counter()
                predict_rows(scorers[name][0], *encoded)
                scoring[name].append(args.rows / (time.perf_counter() - started))
    table = Table(title=f"predict, {args.rows:,} rows × 3 tasks, MMoE defaults, {args.threads} threads, median of "
                        f"{args.rounds} rounds")
    for heading in ("model", "mbtrain predict rows/s (read, encode, score)", "scoring alone rows/s"):
        table.add_column(heading, justify="right")
    for name in sources:
        table.add_row(name, f"{statistics.median(end_to_end[name]):,.0f}", f"{statistics.median(scoring[name]):,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
