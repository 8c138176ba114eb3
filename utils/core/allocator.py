"""glibc's allocator setting for the CPU path: keep freed memory for reuse.

glibc maps every allocation above its mmap threshold (at most 32 MiB) on its own and unmaps it when
freed, so each new large tensor pays its page faults again. At batch 32 the fc1 outputs (39 MB) and
attention maps (30 MB) of DeiT-S are such tensors, thousands of them in calibration; on the 2-core
development machine keeping the memory cut calibration by about a tenth and a calibrated forward
pass by about a fifth (BENCHMARKS.md). PyTorch's
CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc. Values do not change.
"""
import ctypes
import os
import sys

# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DISABLE_ENV = 'QWT_SYSTEM_MALLOC'  # set to 1 to leave glibc's defaults alone


def keep_freed_memory(libc=None):
    """Serve large blocks from the heap and never return it to the OS (``mallopt``).

    Returns True when the setting is in force; False off Linux/glibc, or when ``QWT_SYSTEM_MALLOC=1``.
    ``libc``: the C library to call (tests pass a stand-in)."""
    if os.environ.get(DISABLE_ENV, '0') not in ('', '0') or (libc is None and not sys.platform.startswith('linux')):
        return False
    try:
        libc = libc or ctypes.CDLL('libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    # mallopt returns 1 on success; M_TRIM_THRESHOLD takes an int, so its largest value
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
