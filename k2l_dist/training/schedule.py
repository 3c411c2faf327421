"""Learning rates: a base rate per optimiser parameter group, stepped down at milestones.

The rate is a function of the global step alone, so a resumed run (any world size) gets
the rate an uninterrupted one would have had, without a scheduler state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LRSchedule:
    base: tuple[float, ...]  # one rate per parameter group, in the optimiser's order
    milestones: tuple[int, ...] = ()  # global steps from which the rate is multiplied by gamma
    gamma: float = 0.1

    def factor(self, step: int) -> float:
        """``gamma`` to the number of milestones reached; ``step`` = iterations done so far."""
        return self.gamma ** sum(step >= m for m in self.milestones)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if len(optimizer.param_groups) != len(self.base):
            raise ValueError(f"{len(optimizer.param_groups)} parameter groups for {len(self.base)} base rates")
        f = self.factor(step)
        for group, lr in zip(optimizer.param_groups, self.base):
            group["lr"] = lr * f
