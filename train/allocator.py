"""Host allocator settings for training on CPU.

A training step frees and re-allocates the same multi-MiB activations every step. With glibc's
defaults, blocks above the dynamic mmap threshold are mmapped and unmapped each time and the
top of the heap is trimmed back to the OS, so every step pays the page faults and zero-filling
of that memory again. Keeping freed memory in the process removes that cost (measured 8-12% of
a tiny-v3 training step, `bench/model_step.py`) without raising the peak: memory that is kept
is memory the next step allocates again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit; larger blocks are still mmapped
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim below 2 GiB of free heap top
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps


def retain_freed_memory() -> bool:
    """Ask glibc malloc to keep freed blocks (< 32 MiB) for reuse. False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt tuning)
    except (OSError, AttributeError, TypeError):
        log.info("allocator: not glibc, malloc settings left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = {M_MMAP_THRESHOLD: MMAP_THRESHOLD_MAX, M_TRIM_THRESHOLD: TRIM_THRESHOLD, M_TOP_PAD: TOP_PAD}
    ok = all(mallopt(param, value) == 1 for param, value in settings.items())
    if not ok:
        log.warning("allocator: mallopt refused a setting; training runs with glibc's defaults")
    return ok
