"""Processes that end with the process that started them.

A rank whose torchrun agent was killed (SIGKILL cannot be caught, so the agent cannot
stop its workers) would go on training alone, holding GPUs and writing into the run
folder; a torchrun whose Ray launcher died would do the same. Linux can deliver a
signal to a child when its parent dies (``prctl(PR_SET_PDEATHSIG)``): both are set up
so. Elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; True when set.

    Exits at once when the parent is already gone (re-parented to init before the call).
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True
