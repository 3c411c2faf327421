"""Process memory, for the logs and the benchmarks (torch-free: the clustering actor uses it)."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
