"""glibc malloc settings for CPU inference (opt-in for library users; the CLI applies them).

A CPU prefill allocates and frees tens of large temporaries a layer (a 4K prompt's q is 9 MB, its
gate/up product 50 MB). glibc serves blocks above its mmap threshold (128 KiB, raised on the fly
as such blocks are freed, up to 32 MiB) with fresh `mmap`s, and returns the heap's free top to
the system above its trim threshold: either way the next allocation's pages fault in again. A
process's first 4K prefill of the default model (2 threads) took a median 0.51 M minor page
faults and 0.75 s of system time; with the settings below 0.15 M and 0.27 s, and 6 % less wall
time (median of 6 rounds' ratios 0.94; minima 6.13 -> 5.66 s), for 110 MiB more peak resident
memory (`python bench/cold_prefill.py --rounds 6`, bench/results/prefill/cold-4096.md). Later
prefills in a process gain less: glibc's own threshold has risen by then.

The cost: freed memory stays with the process (its resident size stays at the heap's peak), as
PyTorch's CUDA caching allocator keeps device memory. So it is a process-wide choice, made by the
CLI (its own processes; `FLEXKV_TUNE_MALLOC=0` keeps glibc's defaults) and offered to programs
as `tune_cpu_allocator()`; importing flexkv changes nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20    # glibc's upper limit on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**31 - 1   # mallopt takes an int: never trim in practice


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap threshold to its maximum and stop heap trimming for this process (see
    the module doc). Returns whether both settings took; False, changing nothing, where the C
    library is not glibc (macOS, musl, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    took = [mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(took)   # mallopt returns 1 on success


def tune_for_cli(device: str) -> bool:
    """The CLI's call before it loads a model: on a CPU device unless `FLEXKV_TUNE_MALLOC=0`."""
    if not str(device).startswith("cpu") or os.environ.get("FLEXKV_TUNE_MALLOC", "1") == "0":
        return False
    return tune_cpu_allocator()
