"""Waits that end: polling something outside a collective while watching the other ranks.

A rank that waits for a file another rank writes, or for a Ray round, is in no
collective: nothing would tell it that the rank it waits for has died. Between polls
it reads the heartbeats the watchdog publishes (:func:`~k2l_dist.distributed.watchdog.check_peers`),
so a failed or silent peer ends the wait within seconds, named.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from k2l_dist.distributed.watchdog import check_peers


def wait_until(ready: Callable[[], bool], what: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Until ``ready()`` (polled every ``poll_s``; 0 when ``ready`` itself waits a while);
    :class:`~k2l_dist.distributed.watchdog.PeerLost` when another rank fails or goes silent,
    TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        check_peers()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout_s:.0f} s")
        if poll_s > 0:
            time.sleep(poll_s)
