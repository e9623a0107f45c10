#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA device and a CUDA build of torch in the Python
# that runs it (PYTHON, default python3; the project installed in it, e.g. pip install -e '.[dev]').
# Prints, within 8 minutes on one GPU: the CUDA-marked tests, the speed figures on the GPU (plain and MetaBalance,
# its per-task backward passes one by one and batched, at batch 1024 and 64),
# the operator counts, and the share of training spent waiting for data (mbtrain fit's data_share) with the data
# in memory (the batches cut on the GPU) and streamed (pinned and copied one batch ahead). The whole suite is CI's
# job (on CPU): it is left out here to keep within the time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
echo "== CUDA tests (${SECONDS}s)"
"$PYTHON" -m pytest -q -m cuda -rs
# /batched: --task-backward batched, the per-task backward passes as one (the loop is the default: faster on a
# 2-core CPU; these lines say which wins on the GPU)
echo "== speed, batch 1024 (${SECONDS}s)"
"$PYTHON" benchmarks/speed.py --skip encoding --device cuda --variants none metabalance metabalance/batched \
    --models mmoe mmoe+funnel --rounds 2
echo "== speed, batch 64 (${SECONDS}s)"
"$PYTHON" benchmarks/speed.py --skip encoding --device cuda --rows 50000 --batch-size 64 \
    --variants none metabalance metabalance/batched --rounds 2
echo "== operator counts (${SECONDS}s)"
"$PYTHON" benchmarks/ops.py --device cuda --variants none metabalance metabalance/batched multibalance
echo "== data wait: mbtrain fit, 200,000 generated rows, 2 epochs (${SECONDS}s)"
"$PYTHON" - <<'EOF'
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, "benchmarks")
from synthetic import TASKS, impressions

RUNS = [("none", "in memory", []), ("metabalance", "in memory", []), ("none", "streamed", ["--memory-budget", "16M"])]
with tempfile.TemporaryDirectory() as folder:
    data = Path(folder) / "train.parquet"
    impressions(200_000).write_parquet(data, row_group_size=20_000)  # row groups: the streamed run holds some out
    print(f"{'balance':<12} {'data':<10} {'epoch':>5} {'rows/s':>12} {'data_share':>10}")
    for balance, storage, extra in RUNS:
        out = Path(folder) / f"{balance}-{storage.replace(' ', '-')}"
        subprocess.run([sys.executable, "-m", "mbtrain", "fit", str(data), "--tasks", ",".join(TASKS), "--balance",
                        balance, "--epochs", "2", "--device", "cuda", "--seed", "0", "--out", str(out), *extra],
                       check=True, stdout=subprocess.DEVNULL)
        for line in (out / "history.jsonl").read_text().splitlines():
            row = json.loads(line)
            print(f"{balance:<12} {storage:<10} {row['epoch']:>5} {row['rows_per_second']:>12,.0f} "
                  f"{row['data_share']:>10.4f}")
EOF
echo "== done (${SECONDS}s)"
