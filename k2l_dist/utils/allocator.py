"""glibc's malloc kept from handing large tensors back to the kernel.

With glibc's defaults every block above the (dynamic) mmap threshold is a fresh ``mmap``
and is unmapped when freed, so each CPU training step page-faults its activations in
again: about twice the step time (BENCHMARKS.md, ``bench/bench_allocator.py``). Raising
the mmap and trim thresholds keeps those blocks in the heap for the next step. Users
used to export ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` before Python
started; the package now does the same through ``mallopt`` when it is imported, and sets
the two variables for the processes it starts.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Literal

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
# mallopt takes a C int: 2 GiB - 1 keeps every step's tensors on the heap
THRESHOLD_BYTES = 2**31 - 1
ENV_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT = "K2L_MALLOC_TUNING"  # "0": leave glibc's defaults

AllocatorState = Literal["environment", "mallopt", "off", "unavailable"]
_state: AllocatorState | None = None


def tune_allocator() -> AllocatorState:
    """Raise glibc's mmap and trim thresholds for this process and its children, once.

    Returns what holds: ``environment`` (the user exported ``MALLOC_*_THRESHOLD_``, which
    glibc read at start-up and which are left alone), ``mallopt`` (set now), ``off``
    (``K2L_MALLOC_TUNING=0``) or ``unavailable`` (not glibc, e.g. macOS or musl).
    """
    global _state
    if _state is None:
        _state = _apply()
    return _state


def allocator_state() -> AllocatorState | None:
    """What :func:`tune_allocator` did in this process (None before it ran)."""
    return _state


def _apply() -> AllocatorState:
    if os.environ.get(OPT_OUT, "1") == "0":
        return "off"
    if all(key in os.environ for key in ENV_KEYS):
        return "environment"
    if not sys.platform.startswith("linux"):
        return "unavailable"
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "unavailable"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)):
        return "unavailable"
    for key in ENV_KEYS:  # processes started from here (torchrun ranks, Ray workers) get it at start-up
        os.environ.setdefault(key, str(THRESHOLD_BYTES))
    return "mallopt"
