#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA device and a CUDA build of torch in the Python
# that runs it (PYTHON, default python3; the project installed in it, e.g. pip install -e '.[dev]').
# Prints the CUDA-marked tests, the whole suite, and the speed figures on the GPU (plain and MetaBalance).
set -euo pipefail
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PYTHON" -m pytest -q -m cuda -rs
"$PYTHON" -m pytest -q -x
"$PYTHON" benchmarks/speed.py --skip encoding --device cuda --variants none metabalance --models mmoe ple --rounds 3
