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
                     tags: dict[str, float] | None = None) -> int:
    """Optimiser steps ``start`` … ``iterations - 1`` of a phase over (repeated epochs of)
    ``loader``; returns the new global step.

    A phase resumed at ``start`` first draws (and drops) the ``start`` batches it had
    already trained on, so it goes on with the batches it would have seen.
    ``before_step(i)`` runs before phase step i (e.g. reseeding), ``after_step(i + 1,
    global_step)`` after its update (e.g. checkpoints). ``prefix`` names the curves (one
    per stage, over the global step), ``phase`` the part of it in messages and fault
    points, ``tags`` constant scalars logged with every line (the round number); the
    phase's wall time is logged at its end as ``phase_seconds``."""
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
        check_finite(losses, model, f"{phase} step {step + 1}")
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


def check_finite(losses: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """Stop before a NaN/inf reaches the weights (one host sync per step: the terms and the
    gradient norm checked together)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    terms = [k for k, v in losses.items() if v.requires_grad or k == "loss"]
    values = torch.stack([losses[k].detach().float() for k in terms] +
                         [torch.nn.utils.get_total_norm(grads).float().to(losses["loss"].device)])
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = [k for k, ok in zip(terms, finite.tolist()) if not ok]
    grad = "" if bool(finite[-1]) else "; the gradient norm is not finite"
    raise NonFiniteLoss(f"{where}: loss term(s) {', '.join(bad) or 'none'} not finite{grad}. The weights were not "
                        f"updated; resume from the last checkpoint with a lower learning rate")


def forever(loader) -> Iterator[dict]:
    """The loader's batches, epoch after epoch."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training loader yielded no batch")
