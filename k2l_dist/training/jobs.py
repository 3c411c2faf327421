"""Several trainings at once on one machine, each on cores of its own (and a GPU of its own
when the machine has GPUs).

Two torch processes that share cores thrash (their OpenMP threads spin), so every job is
pinned to a disjoint set of cores; a run sizes its thread pools from the cores it may use
(``dist.threads`` = 0), so its config needs no thread count and stays the one a run in the
ablation's own process would save. A job dies with its launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from k2l_dist.config import ConfigError
from k2l_dist.distributed.lifetime import die_with_parent
from k2l_dist.utils.processes import exit_description


@dataclass(frozen=True)
class Job:
    name: str  # what the progress lines call it
    command: list[str]
    log: Path  # the job's stdout and stderr


def core_sets(slots: int, cores: list[int]) -> list[list[int]]:
    """Disjoint cores for each of ``slots`` concurrent jobs (every slot gets at least one; with
    more slots than cores, slots share a core)."""
    if slots <= len(cores):
        return [cores[k::slots] for k in range(slots)]
    return [[cores[k % len(cores)]] for k in range(slots)]


def gpu_for(slot: int, gpus: int, visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of slot ``slot``: the slot's index into the GPUs this process
    sees (``visible``, when set, names them)."""
    index = slot % gpus
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return names[index] if index < len(names) else str(index)


def run_jobs(jobs: list[Job], parallel: int, gpus: int = 0, poll_s: float = 1.0) -> dict[str, int]:
    """Runs every job, at most ``parallel`` at once, and returns each one's exit code by name.

    A failing job does not stop the others (their work is kept); Ctrl-C or SIGTERM stops
    them all. With ``gpus`` > 0, slot k gets the k-th GPU (mod ``gpus``) of those visible here."""
    if parallel < 1:
        raise ConfigError(f"--jobs must be >= 1, got {parallel}")
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("--jobs > 1 pins each job to its own cores, which needs Linux (os.sched_setaffinity)")
    cores = sorted(os.sched_getaffinity(0))
    if parallel > len(cores):
        print(f"--jobs {parallel} on {len(cores)} cores: jobs share cores and their steps will thrash")
    if gpus and parallel > gpus:
        print(f"--jobs {parallel} on {gpus} GPUs: jobs share GPUs")
    slot_cores = core_sets(parallel, cores)
    pending, running, codes = list(jobs), {}, {}
    free = list(range(parallel))
    with _terminated_as_interrupt():
        try:
            while pending or running:
                while pending and free:
                    slot, job = free.pop(0), pending.pop(0)
                    gpu = gpu_for(slot, gpus, os.environ.get("CUDA_VISIBLE_DEVICES")) if gpus else None
                    running[slot] = (job, _start(job, slot_cores[slot], gpu), time.time())
                    print(f"[{len(codes)}/{len(jobs)} done] {job.name}: started on cores "
                          f"{','.join(map(str, slot_cores[slot]))}{f', GPU {gpu}' if gpu else ''} "
                          f"(log: {job.log})", flush=True)
                time.sleep(poll_s)
                for slot, (job, proc, began) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    codes[job.name] = proc.returncode
                    del running[slot]
                    free.append(slot)
                    how = (f"finished in {(time.time() - began) / 60:.1f} min" if proc.returncode == 0 else
                           f"FAILED ({exit_description(proc.returncode)}); see {job.log}")
                    print(f"[{len(codes)}/{len(jobs)} done] {job.name}: {how}", flush=True)
        finally:
            _stop(proc for _, proc, _ in running.values())
    return codes


def _start(job: Job, cores: list[int], gpu: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "ab") as log:  # a rerun appends: the header says where each attempt starts
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(job.command)}\n".encode())
        log.flush()

        def pinned() -> None:  # in the child, before it starts
            os.sched_setaffinity(0, cores)
            die_with_parent(signal.SIGTERM)

        return subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=pinned)


@contextlib.contextmanager
def _terminated_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while jobs run (signals reach the main thread only), so
    the jobs are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _stop(procs) -> None:
    """Terminates jobs still running (an interrupt or an error here): a run resumes from its
    last checkpoint."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

