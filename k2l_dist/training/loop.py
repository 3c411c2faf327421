"""The optimiser loop every training phase runs: steps over a loader, NaN guard, logging."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from k2l_dist.distributed import DistInfo
from k2l_dist.distributed.collectives import max_over_ranks, mean_over_ranks
from k2l_dist.distributed.watchdog import heartbeat
from k2l_dist.training.schedule import LRSchedule
from k2l_dist.training.steps import autocast
from k2l_dist.utils.faults import fault_requested, maybe_hang
from k2l_dist.utils.memory import peak_rss_bytes
from k2l_dist.utils.metrics import MetricsLogger


class NonFiniteLoss(RuntimeError):
    """A loss term or gradient became NaN or inf; the message names the step and the terms."""


def train_iterations(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader,
                     loss_fn: Callable[[dict], dict], iterations: int, *, info: DistInfo, step: int,
                     log: MetricsLogger, prefix: str, log_every: int, show_progress: bool, start: int = 0,
                     before_step: Callable[[int], None] | None = None,
                     after_step: Callable[[int, int], None] | None = None, precision: str = "fp32",
                     schedule: LRSchedule | None = None, phase: str = "",
                     tags: dict[str, float] | None = None, check_every: int = 1) -> int:
    """Optimiser steps ``start`` … ``iterations - 1`` of a phase over (repeated epochs of)
    ``loader``; returns the new global step.

    A phase resumed at ``start`` first draws (and drops) the ``start`` batches it had
    already trained on, so it goes on with the batches it would have seen.
    ``before_step(i)`` runs before phase step i (e.g. reseeding), ``after_step(i + 1,
    global_step)`` after its update (e.g. checkpoints). ``prefix`` names the curves (one
    per stage, over the global step), ``phase`` the part of it in messages and fault
    points, ``tags`` constant scalars logged with every line (the round number); the
    phase's wall time is logged at its end as ``phase_seconds``. Losses and gradients are
    checked for NaN/inf every ``check_every`` steps (:class:`FiniteGuard`)."""
    model.train()
    phase = phase or prefix.rstrip("/")
    began = time.perf_counter()
    batches = forever(loader)
    for j in range(start):
        heartbeat(f"{phase} (skipping to the resumed batch)", j)
        next(batches)
    bar = tqdm(range(start, iterations), desc=phase, unit="it", disable=not show_progress, leave=False)
    device = next(model.parameters()).device
    window = _LogWindow(log, prefix, info.world_size, tags or {})
    poison = fault_requested(f"nan:{phase}")
    guard = FiniteGuard(check_every)
    for i in bar:
        heartbeat(phase, i)
        maybe_hang(f"{phase}:{i}", info.rank)
        if before_step is not None:
            before_step(i)
        if schedule is not None:
            schedule.apply(optimizer, step)
        batch = next(batches)
        with autocast(device, precision):
            losses = loss_fn(batch)
        if poison:  # injected (K2L_FAULT=nan:<phase>): the first step's loss becomes NaN
            losses["loss"], poison = losses["loss"] * float("nan"), False
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        guard.record(losses, model, f"{phase} step {step + 1}")
        if guard.due(i + 1, iterations):
            guard.check()  # before the update: at every=1 a bad step never lands
        optimizer.step()
        step += 1
        window.count()
        if step % log_every == 0:
            bar.set_postfix(loss=f"{window.write(step, losses, batch, optimizer):.4f}")
        if after_step is not None:
            after_step(i + 1, step)
    if iterations > start:
        # the largest rank's peak memory so far: a multi-day run shows a leak as a rising curve
        log.scalars(step, {"phase_seconds": time.perf_counter() - began,
                           "peak_rss_gb": max_over_ranks(peak_rss_bytes() / 1e9)}, prefix)
    return step


class _LogWindow:
    """The steps since the last logged line: losses averaged over ranks, and
    ``step_seconds_slowest``, the slowest rank's mean step time, where stragglers show."""

    def __init__(self, log: MetricsLogger, prefix: str, world_size: int, tags: dict[str, float]) -> None:
        self.log, self.prefix, self.world_size, self.tags = log, prefix, world_size, tags
        self.steps, self.tick = 0, time.perf_counter()

    def count(self) -> None:
        self.steps += 1

    def write(self, step: int, losses: dict[str, torch.Tensor], batch: dict,
              optimizer: torch.optim.Optimizer) -> float:
        """Logs the window's line at ``step`` and starts a new window; returns the mean loss."""
        now = time.perf_counter()
        seconds = (now - self.tick) / self.steps
        values = mean_over_ranks({k: float(v.detach()) for k, v in losses.items()})
        slowest = max_over_ranks(seconds)
        images = sum(batch[k].shape[0] for k in ("view0", "view1") if k in batch) * self.world_size
        values.update(lr=optimizer.param_groups[0]["lr"], step_seconds=seconds, step_seconds_slowest=slowest,
                      images_per_second=images / max(slowest, 1e-9), **self.tags)
        self.log.scalars(step, values, self.prefix)
        self.steps, self.tick = 0, now
        return values["loss"]


class FiniteGuard:
    """Stops before a NaN/inf reaches a saved state, with one host sync per ``every`` steps.

    Each step's loss terms and gradient norm are stacked on the device; at every ``every``-th
    step of a phase (and its last) they are read at once, before that step's update.
    At ``every=1`` a bad step never updates the weights; at ``every>1`` up to ``every - 1``
    steps before it may have, but checkpoints are only taken at checked steps
    (``checkpoint_every`` is a multiple of ``check_finite_every``), so none holds them."""

    def __init__(self, every: int) -> None:
        self.every = max(1, int(every))
        self.pending: list[tuple[str, list[str], torch.Tensor]] = []

    def record(self, losses: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        terms = [k for k, v in losses.items() if v.requires_grad or k == "loss"]
        values = torch.stack([losses[k].detach().float() for k in terms] +
                             [torch.nn.utils.get_total_norm(grads).float().to(losses["loss"].device)])
        self.pending.append((where, terms, values))

    def due(self, done: int, iterations: int) -> bool:
        """Whether phase step ``done`` (counted from 1) is checked: every ``every``-th step of the
        phase, so that every checkpoint step is, and its last."""
        return done % self.every == 0 or done == iterations

    def check(self) -> None:
        """Reads the steps recorded since the last check; raises at the first bad one."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.isfinite(torch.cat([values for _, _, values in pending])).tolist()  # one read
        start = 0
        for n, (where, terms, values) in enumerate(pending):
            ok, start = flags[start:start + len(values)], start + len(values)
            if not all(ok):
                raise NonFiniteLoss(_non_finite(where, terms, ok, updates=len(pending) - 1 - n))


def _non_finite(where: str, terms: list[str], finite: list[bool], updates: int) -> str:
    """The message for a bad step whose values reached the weights in ``updates`` steps."""
    bad = [k for k, ok in zip(terms, finite) if not ok]
    grad = "" if finite[-1] else "; the gradient norm is not finite"
    weights = ("The weights were not updated" if updates == 0 else
               f"The weights took {updates} update(s) from that step on before the check (check_finite_every); "
               f"no checkpoint holds them")
    return (f"{where}: loss term(s) {', '.join(bad) or 'none'} not finite{grad}. {weights}; resume from the last "
            f"checkpoint with a lower learning rate")


def forever(loader) -> Iterator[dict]:
    """The loader's batches, epoch after epoch."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training loader yielded no batch")
