"""glibc's malloc kept from handing large tensors back to the kernel.

With glibc's defaults every block above the (dynamic) mmap threshold is a fresh ``mmap``
and is unmapped when freed, so each CPU training step page-faults its activations in
again: roughly twice the time of a large step (the paper-size model), 1.03–1.24× on the
small CPU configs (BENCHMARKS.md, ``bench/bench_allocator.py``). Raising
the mmap and trim thresholds keeps those blocks in the heap for the next step. Users
used to export ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` before Python
started. The package now does it for them: the command line (``k2l``, ``python -m
k2l_dist``, torchrun's ranks) starts itself again with the two variables set, before any
work, so it runs exactly as an exported shell would; a program importing the package
gets the same thresholds through ``mallopt`` at import, and the processes it starts get
the variables.
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
EXPORTED_BYTES = "17179869184"  # what a restarted command gets, as users exported it
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


def restart_tuned() -> None:
    """Run this command again, now, with ``MALLOC_*`` exported (glibc reads them only when a
    process starts), unless the user set them, opted out, or this is not glibc. Returns only
    when nothing is to be done; call it first thing in a command-line entry point."""
    if allocator_state() != "mallopt" or not getattr(sys, "orig_argv", None):
        return
    env = {**os.environ, **dict.fromkeys(ENV_KEYS, EXPORTED_BYTES)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # the same interpreter, flags and arguments


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
