"""Keep freed memory in the process for reuse (glibc), which training on CPU needs.

Every step allocates and frees the same tensors of a few MB. With glibc's defaults some of them are mapped
from the kernel and unmapped on free, and the heap's free top is trimmed back, so the next step faults the
same pages in afresh, hundreds of page faults a step. Fixed thresholds (which also end glibc's adaptive ones)
keep those pages in the process: no faults after the first steps, and faster steps (docs/benchmarks.md has the
figures). Buffers above MMAP_THRESHOLD (encoded data) still
go back to the kernel when freed, and at most TRIM_THRESHOLD of free memory is kept at the heap's top.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 64 * 2**20  # allocations above this still come from (and go back to) the kernel
TRIM_THRESHOLD = 256 * 2**20  # free memory at the heap's top kept before glibc returns any


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False (nothing done) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 (glibc only; musl and others lack it)
    except (OSError, AttributeError, TypeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
