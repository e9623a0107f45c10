"""The reference library beside us: torch-rechub 0.0.3's MMoE and MTLTrainer, with and without its MetaBalance.

Runs only in the benchmark's own environment, never as a dependency of mbtrain:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0          # first, exactly this pin (a CPU build)
    .venv-bench/bin/pip install -e .
    .venv-bench/bin/pip install --no-deps torch-rechub==0.0.3
    .venv-bench/bin/pip install pandas tqdm scikit-learn

The data are encoded as a careful user of the library would: categoricals label-encoded with the vocabulary
of the training rows (values seen fewer than `min_frequency` times there, unseen values and nulls share the
reserved index 0), numerics standardised with the training mean and standard deviation (nulls become the mean).
An integer column may be both categorical and numeric; its dense copy is fed under the key `num:<column>`.

Timing: the trainer instance's own `train_one_epoch` and `evaluate` are wrapped with `time.perf_counter`, so
an epoch's seconds are exactly the library's training pass plus its validation pass, as `mbtrain fit` counts
them; the early stopper's weight copy and the final `torch.save` of `fit` are outside. Early stopping is off
unless `patience` is given. The test AUC is that of the epoch with the best validation AUC of the main task:
the library restores those weights only when early stopping fires, so they are restored here after `fit`.

Standalone: `python benchmarks/rechub_reference.py --data ../shared/data/adult/adult.parquet` splits the file
as `benchmarks/adult_quality.py` does (seeded permutation, first 80% train, the rest test), holds out the last
10% of the training rows (in shuffled order) for validation, and prints s/epoch and test AUC per task.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import torch
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.models.multi_task import MMOE
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import DataGenerator

ADULT_TASKS = ["income_50k", "never_married"]
# As `mbtrain inspect adult.parquet --tasks income_50k,never_married` decides the roles.
ADULT_CATEGORICAL = ["age", "workclass", "education", "educational-num", "occupation", "relationship", "race",
                     "gender", "capital-gain", "capital-loss", "hours-per-week", "native-country"]
ADULT_NUMERIC = ["age", "fnlwgt", "capital-gain", "capital-loss", "hours-per-week"]


def _pandas(frame: Any) -> pd.DataFrame:
    return frame.to_pandas() if isinstance(frame, pl.DataFrame) else frame


def encode(train: pd.DataFrame, frames: list[pd.DataFrame], categorical: list[str], numeric: list[str],
           tasks: list[str], min_frequency: int = 2) -> tuple[dict[str, int], list[tuple[dict[str, np.ndarray],
                                                                                          np.ndarray]]]:
    """Fit vocabularies and numeric statistics on `train`; return vocabulary sizes and (x, y) per frame."""
    vocabularies: dict[str, pd.Index] = {}
    for column in categorical:
        counts = train[column].value_counts(dropna=True)
        vocabularies[column] = pd.Index(counts[counts >= min_frequency].index)
    stats: dict[str, tuple[float, float]] = {}
    for column in numeric:
        values = train[column].astype("float64")
        mean, std = float(values.mean()), float(values.std(ddof=0))
        stats[column] = (mean, std if std > 0 else 1.0)
    encoded = []
    for frame in frames:
        x: dict[str, np.ndarray] = {}
        for column, vocabulary in vocabularies.items():
            x[column] = (vocabulary.get_indexer(frame[column]) + 1).astype(np.int64)  # unseen / null -> 0
        for column, (mean, std) in stats.items():
            values = frame[column].astype("float64").fillna(mean).to_numpy()
            x[f"num:{column}"] = ((values - mean) / std).astype(np.float32)
        encoded.append((x, frame[tasks].to_numpy(dtype=np.float32)))
    return {column: len(vocabulary) + 1 for column, vocabulary in vocabularies.items()}, encoded


def run_reference(train: Any, valid: Any, test: Any, categorical: list[str], numeric: list[str], tasks: list[str],
                  balance: str = "none", epochs: int = 5, batch_size: int = 1024, embed_dim: int = 8,
                  experts: int = 8, hidden: list[int] | None = None, tower: list[int] | None = None,
                  lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, threads: int = 2,
                  min_frequency: int = 2, patience: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Train torch-rechub's MMOE with its MTLTrainer (`balance` "none" or "metabalance"; tasks[0] is the main task).

    Returns seconds_per_epoch (training + validation, averaged over the epochs run), train_seconds_per_epoch,
    test_auc {task: auc} with the best-validation weights, and diagnostics.
    """
    if balance not in ("none", "metabalance"):
        raise ValueError(f"balance must be 'none' or 'metabalance', got {balance!r}")
    hidden = [64, 32] if hidden is None else hidden
    tower = [16] if tower is None else tower
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # embedding / linear init and the DataLoader's shuffling draw from the global RNG

    train, valid, test = _pandas(train), _pandas(valid), _pandas(test)
    sizes, ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) = encode(
        train, [train, valid, test], categorical, numeric, tasks, min_frequency)
    features = [SparseFeature(column, vocab_size=size, embed_dim=embed_dim) for column, size in sizes.items()]
    features += [DenseFeature(f"num:{column}") for column in numeric]
    task_types = ["classification"] * len(tasks)
    model = MMOE(features, task_types, n_expert=experts, expert_params={"dims": hidden},
                 tower_params_list=[{"dims": tower} for _ in tasks])
    train_loader, valid_loader, test_loader = DataGenerator(x_train, y_train).generate_dataloader(
        x_val=x_valid, y_val=y_valid, x_test=x_test, y_test=y_test, batch_size=batch_size)

    train_seconds: list[float] = []
    valid_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        trainer = MTLTrainer(model, task_types, optimizer_params={"lr": lr, "weight_decay": weight_decay},
                             adaptive_params={"method": "metabalance"} if balance == "metabalance" else None,
                             n_epoch=epochs, earlystop_patience=epochs + 1 if patience is None else patience,
                             device="cpu", model_path=folder)
        library_train, library_evaluate = trainer.train_one_epoch, trainer.evaluate

        def timed_train(loader: Any) -> Any:
            started = time.perf_counter()
            out = library_train(loader)
            train_seconds.append(time.perf_counter() - started)
            return out

        def timed_evaluate(module: Any, loader: Any) -> Any:
            started = time.perf_counter()
            out = library_evaluate(module, loader)
            valid_seconds.append(time.perf_counter() - started)
            return out

        trainer.train_one_epoch, trainer.evaluate = timed_train, timed_evaluate
        with contextlib.ExitStack() as stack:
            if quiet:  # the library prints per-epoch logs and tqdm bars
                sink = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(sink))
                stack.enter_context(contextlib.redirect_stderr(sink))
            started = time.perf_counter()
            log = trainer.fit(train_loader, valid_loader, mode=balance, seed=seed)
            fit_seconds = time.perf_counter() - started
            trainer.evaluate = library_evaluate
            model.load_state_dict(trainer.early_stopper.best_weights)
            scores = trainer.evaluate(model, test_loader)

    valid_auc = [row[len(tasks):] for row in log]
    best_epoch = 1 + max(range(len(valid_auc)), key=lambda i: (valid_auc[i][0], -i))
    shared = list(model.embedding.parameters()) + list(model.experts.parameters())
    epoch_seconds = [t + v for t, v in zip(train_seconds, valid_seconds, strict=True)]
    return {
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
        "train_seconds_per_epoch": sum(train_seconds) / len(train_seconds),
        "valid_seconds_per_epoch": sum(valid_seconds) / len(valid_seconds),
        "fit_seconds": fit_seconds,
        "median_seconds_per_epoch": float(np.median(epoch_seconds)),  # robust to a busy neighbour
        "epoch_seconds": epoch_seconds,
        "epochs_run": len(log),
        "best_epoch": best_epoch,
        "valid_auc": [dict(zip(tasks, row, strict=True)) for row in valid_auc],
        "test_auc": dict(zip(tasks, (float(s) for s in scores), strict=True)),
        "train_loss": [dict(zip(tasks, row[:len(tasks)], strict=True)) for row in log],
        # Its MetaBalance keeps per-parameter norms on `param.norms` and `break`s out of the parameter loop at
        # the first parameter with no gradient; a shared parameter without `norms` was silently skipped.
        "metabalance_skipped_params": sum(not hasattr(p, "norms") for p in shared) if balance == "metabalance"
        else None,
        "rows": {"train": len(train), "valid": len(valid), "test": len(test)},
    }


def adult_split(frame: pl.DataFrame, seed: int, valid_fraction: float = 0.1
                ) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The split of benchmarks/adult_quality.py (first 80% of a seeded permutation train, the rest test),
    with the last `valid_fraction` of the training rows, in shuffled order, held out for validation."""
    order = torch.randperm(frame.height, generator=torch.Generator().manual_seed(seed)).numpy()
    cut = int(frame.height * 0.8)
    held = min(max(1, round(cut * valid_fraction)), cut - 1)
    return frame[order[:cut - held]], frame[order[cut - held:cut]], frame[order[cut:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--data", type=Path, default=shared / "data/adult/adult.parquet")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--balance", nargs="+", default=["none", "metabalance"], choices=["none", "metabalance"])
    args = parser.parse_args()

    frame = pl.read_parquet(args.data)
    header = (f"{'seed':>4} {'balance':>11} {'s/epoch':>8} {'median':>8} {'train s':>8} {'valid s':>8} {'best ep':>7} "
              + " ".join(f"{task:>14}" for task in ADULT_TASKS) + "  skipped")
    print(f"torch-rechub 0.0.3 MMOE on {args.data} ({frame.height:,} rows), {args.epochs} epochs, "
          f"{args.threads} threads; test AUC with the best-validation weights", flush=True)
    print(header, flush=True)
    load = os.getloadavg()[0]
    for seed in args.seeds:
        train, valid, test = adult_split(frame, seed)
        for balance in args.balance:
            result = run_reference(train, valid, test, ADULT_CATEGORICAL, ADULT_NUMERIC, ADULT_TASKS,
                                   balance=balance, epochs=args.epochs, seed=seed, threads=args.threads)
            skipped = result["metabalance_skipped_params"]
            print(f"{seed:>4} {balance:>11} {result['seconds_per_epoch']:>8.3f} "
                  f"{result['median_seconds_per_epoch']:>8.3f} "
                  f"{result['train_seconds_per_epoch']:>8.3f} {result['valid_seconds_per_epoch']:>8.3f} "
                  f"{result['best_epoch']:>7} "
                  + " ".join(f"{result['test_auc'][task]:>14.4f}" for task in ADULT_TASKS)
                  + f"  {'-' if skipped is None else skipped}", flush=True)
    print(f"load average (1 min) before / after: {load:.2f} / {os.getloadavg()[0]:.2f} "
          f"(on {os.cpu_count()} cores; anything well above 0 means the timings shared the CPU)", flush=True)


if __name__ == "__main__":
    main()
