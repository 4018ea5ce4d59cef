"""The process's memory as the operating system sees it: hand the C allocator's free pages back, read the resident set.

glibc keeps freed blocks in its heaps (tens of MB per thread after a batch's tensors, hundreds of MB after loading
quantises every layer through fp32 temporaries), so the resident set says more about what was freed last than
about what is in use until they go back. Used once at load (quantized.py), by GET /admin/status and by
bench/resident.py.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; musl and other systems have none
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def return_free_memory() -> None:
    """Collect Python's garbage, then hand the C allocator's free pages back to the system (glibc; elsewhere only
    the collection)."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def resident_memory_bytes() -> int | None:
    """This process's resident set from /proc/self/statm (pages), once the allocator returned its free pages; None
    off Linux."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
