"""The allocator setting `mbtrain fit` makes: memory freed by one step is reused by the next."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from mbtrain.allocator import keep_freed_memory
if sys.argv[1] == "set" and not keep_freed_memory():
    print("unsupported"); raise SystemExit
for _ in range(2):
    torch.ones(10 * 2**20)  # 40 MB: above glibc's largest adaptive mmap threshold (32 MB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(10 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_freed_tensors_are_reused_instead_of_faulted_in_again() -> None:
    kept = _faults("set")
    if kept == "unsupported":
        pytest.skip("the C library is not glibc")
    # glibc's defaults map each 40 MB afresh (10,240 faults); kept, they are reused (on the development VM
    # about a third of the pages still fault, for reasons outside the process)
    assert int(kept) < int(_faults("default")) / 2
