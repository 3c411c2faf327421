"""Python logging for the command line: configured once, rank-aware."""

from __future__ import annotations

import logging
import os
import sys

_HANDLER_NAME = "k2l"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(rank: int | None = None, debug: bool = False) -> logging.Logger:
    """The ``k2l_dist`` loggers print to stderr: INFO and up on rank 0 (K-means, SVT and round
    reports), WARNING and up on the other ranks, each line prefixed by its rank there.
    Other libraries' loggers are left as they are. Idempotent."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    logger = logging.getLogger("k2l_dist")
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = _Stderr()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO if rank == 0 else logging.WARNING)
    return logger
