"""Which Faiss and DALI builds this environment has, and what to install when one is missing.

Neither is a base dependency: each comes in builds per device (faiss-cpu or a faiss-gpu
for one CUDA major; DALI per CUDA major) that install the same module and break each
other, so the package's extras pick one coherent set: ``.[cpu]``, ``.[cu12]`` or ``.[cu13]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = ('pip install -e ".[cpu]" (CPU), ".[cu12]" or ".[cu13]" (the CUDA major of your driver, after '
                'torch from PyTorch\'s index for it; README "Install")')


class MissingBackend(ImportError):
    """A required library (Faiss, DALI) is not installed; the message says what to install."""


def import_faiss() -> ModuleType:
    """The ``faiss`` module, or :class:`MissingBackend` naming the extras that bring it."""
    try:
        return importlib.import_module("faiss")
    except ImportError as err:
        raise MissingBackend(f"Faiss is not installed ({err}): {INSTALL_HINT}") from None


def import_dali() -> ModuleType:
    """The ``nvidia.dali`` module, or :class:`MissingBackend` naming the extras that bring it."""
    try:
        return importlib.import_module("nvidia.dali")
    except ImportError as err:
        raise MissingBackend(f"NVIDIA DALI is not installed ({err}): {INSTALL_HINT}") from None


def faiss_build() -> str:
    """``"faiss 1.15.1, GPU build, 1 GPU"``, ``"faiss 1.15.1, CPU build"`` or ``"faiss: not installed"``."""
    try:
        faiss = importlib.import_module("faiss")
    except ImportError:
        return "faiss: not installed"
    gpus = getattr(faiss, "get_num_gpus", None)
    if gpus is None or not hasattr(faiss, "StandardGpuResources"):
        return f"faiss {faiss.__version__}, CPU build"
    return f"faiss {faiss.__version__}, GPU build, {gpus()} GPU(s) visible"


def dali_build() -> str:
    """``"DALI 2.0.0 (nvidia-dali-cuda130)"`` or ``"DALI: not installed"``."""
    try:
        dali = importlib.import_module("nvidia.dali")
    except ImportError:
        return "DALI: not installed"
    from importlib.metadata import distributions

    names = [d.metadata.get("Name") or "" for d in distributions()]
    names = [n for n in names if n.lower().startswith("nvidia-dali-cuda")]
    return f"DALI {dali.__version__} ({', '.join(sorted(set(names))) or 'a build pip does not list'})"


ALLOCATOR = {"environment": "allocator tuned (MALLOC_* set at start)", "mallopt": "allocator tuned (mallopt)",
             "off": "allocator: glibc defaults (K2L_MALLOC_TUNING=0)", "unavailable": "allocator: not glibc",
             None: "allocator: not tuned"}


def describe() -> str:
    """One line: torch, Faiss, DALI and the allocator as this process has them."""
    from k2l_dist.utils.allocator import allocator_state

    try:
        import torch

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        torch_line = f"torch {torch.__version__} ({cuda})"
    except ImportError:
        torch_line = "torch: not installed"
    return f"{torch_line}; {faiss_build()}; {dali_build()}; {ALLOCATOR[allocator_state()]}"
