"""Process memory, for the logs and the benchmarks (torch-free: the clustering actor uses it)."""

from __future__ import annotations

import resource
import threading
from pathlib import Path


def peak_rss_bytes() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def resident_bytes() -> dict[str, float]:
    """This process's resident memory now, by kind (Linux ``/proc/self/status``; empty elsewhere):
    ``anon`` (its own), ``shmem`` (shared memory it has touched, e.g. Ray's object store),
    ``file`` (mapped files and libraries)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    names = {"RssAnon:": "anon", "RssShmem:": "shmem", "RssFile:": "file"}
    out = {}
    for line in lines:
        key, *rest = line.split()
        if key in names and rest:
            out[names[key]] = float(rest[0]) * 1024
    return out


class PrivatePeak:
    """The peak of this process's own (anonymous) resident memory while the block runs,
    sampled every ``period`` seconds: unlike the RSS peak, it leaves out shared pages, such
    as those of Ray's object store that the process reads in place."""

    def __init__(self, period: float = 0.02) -> None:
        self.period, self.peak = period, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="k2l-memory", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, resident_bytes().get("anon", 0.0))
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> PrivatePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes().get("anon", 0.0))
