"""The package tunes glibc's allocator itself: large blocks stay in the heap without any export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter: imports k2l_dist (or not), allocates and frees a 64 MiB block, and
# reports glibc's own count of mmapped bytes while it is held (mallinfo2().hblkhd).
PROBE = r"""
import ctypes, json, os, sys
if sys.argv[1] == "import":
    import k2l_dist
    from k2l_dist.utils.allocator import allocator_state
    state = allocator_state()
else:
    state = None
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
print(json.dumps({"state": state, "mmapped": mapped,
                  "env": [os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")]}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "aarch64"),
                                reason="glibc's mallinfo2")


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "K2L_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, "PYTHONPATH": str(ROOT), **env},
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_package_keeps_large_blocks_in_the_heap():
    plain = _probe("plain")
    assert plain["mmapped"] >= 64 << 20  # glibc's default: a 64 MiB block is its own mmap
    tuned = _probe("import")
    assert tuned["state"] == "mallopt"
    assert tuned["mmapped"] == 0
    # children started by the package (torchrun ranks, Ray workers) get it at start-up
    assert tuned["env"] == [str(2**31 - 1)] * 2


def test_the_users_export_is_left_alone_and_opting_out_leaves_glibcs_defaults():
    exported = _probe("import", MALLOC_MMAP_THRESHOLD_="17179869184", MALLOC_TRIM_THRESHOLD_="17179869184")
    assert exported["state"] == "environment" and exported["env"] == ["17179869184"] * 2
    assert exported["mmapped"] == 0
    off = _probe("import", K2L_MALLOC_TUNING="0")
    assert off["state"] == "off" and off["mmapped"] >= 64 << 20 and off["env"] == [None, None]


@pytest.mark.parametrize("command", [["-m", "k2l_dist"], ["-m", "k2l_dist.cli"]])
def test_the_command_line_restarts_itself_with_the_variables_set(command):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "K2L_MALLOC_TUNING"}
    run = lambda **env: subprocess.run([sys.executable, *command, "--backends"], cwd=ROOT, capture_output=True,  # noqa: E731
                                       text=True, check=True, env={**clean, "PYTHONPATH": str(ROOT), **env}).stdout
    assert "allocator tuned (MALLOC_* set at start)" in run()  # as if the user had exported them
    assert "allocator: glibc defaults (K2L_MALLOC_TUNING=0)" in run(K2L_MALLOC_TUNING="0")
