"""One owner per run folder: an advisory lock held for the life of the process.

Two trainings (or a training and an evaluation) writing into one ``run_dir`` would mix
their checkpoints and metrics. The owner holds an ``fcntl`` lock on ``<run_dir>/.lock``,
a file that also says who it is (host, pid, start time, command). The kernel drops the
lock when its process dies, however it dies, so a lock left by a dead run is simply
taken over (with a warning naming the previous owner). On a network file system the lock
is only as good as the server's lock support (NFSv4 and EFS keep them; some FUSE file
systems do not): there, a lock file naming a live process on another host still refuses
the run, but one whose owner died without the server releasing its lock needs removing
by hand.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another process owns the run folder; the message names it."""


def _owner_text(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} (started {started}: {info.get('command', '?')})"


def _read(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except ValueError:
        return {}


class RunLock:
    """``with RunLock(run_dir, "k2l train"):`` — raises :class:`RunLocked` when another process holds it."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self._handle = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the lock
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read(handle)
            handle.close()
            raise RunLocked(f"{self.path.parent} is in use by {_owner_text(owner)}; wait for it to finish, or use "
                            f"another run_dir (a lock left by a crash is taken over by the next run)") from None
        previous = _read(handle)
        if previous.get("pid") and (previous.get("host"), previous.get("pid")) != (socket.gethostname(), os.getpid()):
            log.warning("%s: taking over the lock of %s, which is no longer running", self.path.parent,
                        _owner_text(previous))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                 "command": f"{self.what} ({' '.join(sys.argv[1:])[:200]})"}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            try:
                self._handle.seek(0)
                self._handle.truncate()
                fcntl.lockf(self._handle, fcntl.LOCK_UN)
            finally:
                self._handle.close()
                self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
