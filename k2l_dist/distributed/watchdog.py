"""A hung, dead or failed rank ends the job, named, instead of holding every rank forever.

Each rank's training loop calls :func:`heartbeat` (phase, step) as it goes. A thread per
rank publishes, every few seconds, its rank's last beat, where its main thread is (the
innermost frame, and whether it waits in a collective), its node and host, and the time
of publishing, to the process group's store, so every rank sees the others. The thread
ends the job, naming the culprit, when

* this rank made no progress for ``dist.timeout_s`` (the collectives' own timeout is
  set later, as a backstop): it names the silent rank that is *not* waiting for the
  others, with its phase, step and frame, and exits with :data:`EXIT_HUNG`;
* another rank announced a failure (:func:`announce_failure`, its error's first line)
  or stopped publishing for ``dist.timeout_s`` (its process or node is gone): it names
  that rank and its node and exits with :data:`EXIT_PEER`.

Code that waits on something other than a collective (the shards being prepared, a
Ray round) calls :func:`check_peers` between short waits and raises :class:`PeerLost`.
A rank that finishes publishes that it is done, so its silence is never mistaken for
a loss.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_HUNG = 75
EXIT_PEER = 76
_KEY = "k2l/heartbeat/{}"
_FAILED = "k2l/failed"  # the first failure of the job, set once
# a main thread with one of these in its stack is waiting for other ranks, not stuck itself
_WAITING_IN = ("torch/distributed/", "torch/autograd/", "k2l_dist/distributed/collectives.py",
               "k2l_dist/clustering/ray_service.py", "k2l_dist/distributed/waits.py")


class PeerLost(RuntimeError):
    """Another rank of the job failed or went silent; the message names it and its node."""


def _exit(code: int, headline: str) -> Callable[[str], None]:
    """Ends the process with ``code``: an ``error:`` line like every failure's (``headline``
    before the message), then where this rank's main thread was."""
    def end(message: str) -> None:
        frame = sys._current_frames().get(threading.main_thread().ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        print(f"error: {headline}{message}\nthis rank's main thread:\n{stack}", file=sys.stderr, flush=True)
        os._exit(code)
    return end


class Watchdog:
    """Watches this rank's beats; ``store`` (a torch.distributed Store) shares them across ranks."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None,
                 on_hang: Callable[[str], None] | None = None, on_peer: Callable[[str], None] | None = None,
                 where: dict[str, Any] | None = None) -> None:
        self.rank, self.world_size, self.timeout_s, self.store = rank, world_size, float(timeout_s), store
        # the lost peer leads the message (a rank's own failure reads the same); a hang is diagnosed
        self.on_hang = on_hang or _exit(EXIT_HUNG, "k2l watchdog: ")
        self.on_peer = on_peer or _exit(EXIT_PEER, "")
        self.where = dict(where or {})
        self.phase, self.step = "start", 0
        self.period = max(0.5, min(5.0, self.timeout_s / 8))
        self._last = time.time()
        self._allow = 0.0
        self._armed = False  # beats arm it; pause() between watched sections (loader set-up, evaluation)
        self._done = False
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="k2l-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is done: its silence from now on is not a loss."""
        self._done = True
        self._publish()
        self._stop.set()

    def beat(self, phase: str, step: int = 0, allow_s: float = 0.0) -> None:
        """Progress; ``allow_s`` lengthens the wait before the next beat (a long clustering)."""
        self.phase, self.step, self._last, self._allow = phase, int(step), time.time(), float(allow_s)
        self._armed = True

    def pause(self) -> None:
        self._armed = False

    def state(self) -> dict:
        """This rank's last beat and where its main thread is now."""
        frame = sys._current_frames().get(self._main)
        stack = traceback.extract_stack(frame) if frame is not None else []
        where = f"{os.path.basename(stack[-1].filename)}:{stack[-1].lineno} {stack[-1].name}" if stack else "?"
        waiting = any(marker in f.filename.replace(os.sep, "/") for f in stack for marker in _WAITING_IN)
        return {"phase": self.phase, "step": self.step, "time": self._last, "where": where, "waiting": waiting,
                "alive": time.time(), "done": self._done, **self.where}

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(_KEY.format(self.rank), json.dumps(self.state()))
        except Exception:  # the store's host may be gone: torchrun handles that itself
            pass

    def fail(self, message: str) -> None:
        """Tell every rank this one failed (the first failure of the job is kept)."""
        if self.store is None:
            return
        value = json.dumps({"rank": self.rank, "message": message.splitlines()[0][:500] if message else "",
                            **self.where})
        try:
            self.store.compare_set(_FAILED, "", value)
        except Exception:  # noqa: BLE001 - the store may be gone with its node: nothing more to tell
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            self._publish()
            problem = self.peer_problem()
            if problem is not None and not self._stop.is_set():  # stopped meanwhile: the main thread reports
                self.on_peer(f"{problem}; ending rank {self.rank} too")
                return
            silent = time.time() - self._last
            if self._armed and silent > max(self.timeout_s, self._allow) and not self._stop.is_set():
                self.on_hang(self.diagnose(silent))
                return

    def peer_problem(self, silent_after: float | None = None) -> str | None:
        """A failed rank, or a rank silent for longer than ``silent_after`` (default
        ``dist.timeout_s``), in words; None while every other rank is fine or done."""
        if self.store is None or self._stop.is_set():
            return None
        failed = self._failure()
        if failed is not None and failed.get("rank") != self.rank:
            return f"{_name(failed['rank'], failed)} failed: {failed.get('message') or 'no message'}"
        limit = self.timeout_s if silent_after is None else silent_after
        now = time.time()
        for r, b in sorted(self._beats().items()):
            if r == self.rank or b.get("done"):
                continue
            quiet = now - float(b.get("alive", now))
            if quiet > limit:
                return (f"{_name(r, b)} is gone: no sign of life for {quiet:.0f} s (last heard from in phase "
                        f"{b['phase']}, step {b['step']}, at {b['where']})")
        return None

    def _failure(self) -> dict | None:
        try:
            if self.store.check([_FAILED]):
                return json.loads(self.store.get(_FAILED))
        except Exception:  # noqa: BLE001 - an unreachable store says nothing about the peers
            return None
        return None

    def diagnose(self, silent: float) -> str:
        """The rank that holds the others up: silent and not itself waiting in a collective."""
        beats = self._beats()
        beats[self.rank] = self.state()
        stuck = [r for r in beats if not beats[r]["waiting"]] or list(beats)
        culprit = min(stuck, key=lambda r: beats[r]["time"])
        b = beats[culprit]
        waiting = sorted(r for r in beats if beats[r]["waiting"] and r != culprit)
        others = f"; rank(s) {', '.join(map(str, waiting))} wait for it" if waiting else ""
        return (f"rank {culprit} made no progress for {time.time() - b['time']:.0f} s in phase {b['phase']} "
                f"(last step {b['step']}, now at {b['where']}{others}; reported by rank {self.rank}); "
                f"ending the job after dist.timeout_s={self.timeout_s:g}")

    def _beats(self) -> dict[int, dict]:
        if self.store is None:
            return {}
        keys = [_KEY.format(r) for r in range(self.world_size)]
        try:
            if self.store.check(keys):  # every rank has published: one round trip for all
                return {r: json.loads(v) for r, v in enumerate(self.store.multi_get(keys))}
        except Exception:  # noqa: BLE001 - fall back to one key at a time
            pass
        out = {}
        for r, key in enumerate(keys):
            try:
                if self.store.check([key]):
                    out[r] = json.loads(self.store.get(key))
            except Exception:  # noqa: BLE001
                continue
        return out


def _name(rank: int, beat: dict) -> str:
    where = ", ".join(f"{k} {beat[k]}" for k in ("node", "host") if k in beat)
    return f"rank {rank} ({where})" if where else f"rank {rank}"


_current: Watchdog | None = None


def start(rank: int, world_size: int, timeout_s: float, store=None, where: dict[str, Any] | None = None) -> Watchdog:
    global _current
    stop()
    _current = Watchdog(rank, world_size, timeout_s, store, where=where).start()
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def heartbeat(phase: str, step: int = 0, allow_s: float = 0.0) -> None:
    """Progress of this rank (a no-op when no watchdog runs); arms the watchdog."""
    if _current is not None:
        _current.beat(phase, step, allow_s)


def pause() -> None:
    """Unwatched work follows (building loaders, single-rank evaluation) until the next beat."""
    if _current is not None:
        _current.pause()


def check_peers() -> None:
    """Raise :class:`PeerLost` when another rank has failed or gone silent for ``dist.timeout_s``."""
    problem = _current.peer_problem() if _current is not None else None
    if problem is not None:
        raise PeerLost(problem)


def announce_failure(message: str) -> None:
    """This rank is failing with ``message``: the other ranks stop within seconds, naming it."""
    if _current is not None:
        _current.fail(message)


def lost_peer(wait_s: float | None = None) -> str | None:
    """After a collective failed: the rank that failed or went silent, waiting up to ``wait_s``
    (default three publishing periods) for its silence to show; None when no peer is at fault."""
    if _current is None or _current.store is None:
        return None
    dog = _current
    deadline = time.monotonic() + (3 * dog.period if wait_s is None else wait_s)
    while True:
        problem = dog.peer_problem(silent_after=2.5 * dog.period)
        if problem is not None or time.monotonic() > deadline:
            return problem
        time.sleep(0.2)
