"""What every benchmark prints with its table: the machine, and its own section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """CPU, cores, GPU and library versions, one line."""
    import faiss
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = "/".join(f for f in _ISA if f in flags) or "ISA unknown"
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
    malloc = ", ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MALLOC_")) or "glibc default"
    return (f"{cpu} ({isa}), {len(os.sched_getaffinity(0))} cores visible (shared), {torch.get_num_threads()} torch "
            f"threads, {gpu}; allocator: {malloc}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"faiss {faiss.__version__}; 1-min load {load}")


# the instruction sets that decide the CPU kernels: fp32 (AVX2, AVX-512) and bf16 (AVX-512-BF16, AMX)
_ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the ``name`` section of ``path``, leaving the others as they are."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
