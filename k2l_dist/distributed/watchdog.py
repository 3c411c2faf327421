"""A hung rank ends the job, named, instead of holding every rank in a collective forever.

Each rank's training loop calls :func:`heartbeat` (phase, step) as it goes. A thread per
rank publishes, every few seconds, its rank's last beat and where its main thread is (the
innermost frame, and whether it waits in a collective) to the process group's store, so
every rank sees the others. Once a rank has made no progress for ``dist.timeout_s`` (the
collectives' own timeout is set later, as a backstop), its thread names the culprit: the
silent rank that is *not* waiting for the others, with its phase, step and frame. It then
exits the process with :data:`EXIT_HUNG`; torchrun ends (or restarts) the job.
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

log = logging.getLogger(__name__)

EXIT_HUNG = 75
_KEY = "k2l/heartbeat/{}"
# a main thread with one of these in its stack is waiting for other ranks, not stuck itself
_WAITING_IN = ("torch/distributed/", "torch/autograd/", "k2l_dist/distributed/collectives.py",
               "k2l_dist/clustering/ray_service.py")


class Watchdog:
    """Watches this rank's beats; ``store`` (a torch.distributed Store) shares them across ranks."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None,
                 on_hang: Callable[[str], None] | None = None) -> None:
        self.rank, self.world_size, self.timeout_s, self.store = rank, world_size, float(timeout_s), store
        self.on_hang = on_hang or _exit_hung
        self.phase, self.step = "start", 0
        self._last = time.time()
        self._allow = 0.0
        self._armed = False  # beats arm it; pause() between watched sections (loader set-up, evaluation)
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="k2l-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
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
        return {"phase": self.phase, "step": self.step, "time": self._last, "where": where, "waiting": waiting}

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            self.store.set(_KEY.format(self.rank), json.dumps(self.state()))
        except Exception:  # the store's host may be gone: torchrun handles that itself
            pass

    def _watch(self) -> None:
        period = max(0.5, min(5.0, self.timeout_s / 8))
        while not self._stop.wait(period):
            self._publish()
            silent = time.time() - self._last
            if self._armed and silent > max(self.timeout_s, self._allow):
                self.on_hang(self.diagnose(silent))
                return

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
        out = {}
        for r in range(self.world_size):
            try:
                if self.store.check([_KEY.format(r)]):
                    out[r] = json.loads(self.store.get(_KEY.format(r)))
            except Exception:
                continue
        return out


def _exit_hung(message: str) -> None:
    frame = sys._current_frames().get(threading.main_thread().ident)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
    print(f"k2l watchdog: {message}\nthis rank's main thread:\n{stack}", file=sys.stderr, flush=True)
    os._exit(EXIT_HUNG)


_current: Watchdog | None = None


def start(rank: int, world_size: int, timeout_s: float, store=None) -> Watchdog:
    global _current
    stop()
    _current = Watchdog(rank, world_size, timeout_s, store).start()
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
