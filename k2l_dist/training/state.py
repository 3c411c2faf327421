"""A run's state: what a checkpoint holds, how it is saved, and how a resume rebuilds it.

:class:`RunState` holds Φ and its optimiser, the pseudo-label table, the round's centroids
and, once Stage 2 has started, Ψ, its optimiser, labels, centroids and flip permutation.
:class:`CheckpointManager` saves it (rank 0, atomically, the previous file kept) and picks
the checkpoint every rank resumes from.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from k2l_dist.clustering.rounds import RoundLabels
from k2l_dist.config import Config, LrScaling
from k2l_dist.distributed import DistInfo
from k2l_dist.distributed.collectives import broadcast_json
from k2l_dist.models import KeypointNet, LandmarkNet
from k2l_dist.training.compat import incompatible_changes
from k2l_dist.training.labels import LabelTable
from k2l_dist.training.optim import rmsprop
from k2l_dist.utils.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint
from k2l_dist.utils.devices import place

Phase = Literal["warmup", "round", "stage2", "done"]


@dataclasses.dataclass
class Progress:
    """Where a run stands; a checkpoint holding it resumes at the same batch."""

    phase: Phase = "warmup"
    rounds_done: int = 0  # finished Stage-1 rounds
    phase_step: int = 0  # iterations done in the current phase
    step: int = 0  # Stage-1 iterations so far
    step2: int = 0  # Stage-2 iterations so far

    def finished(self, cfg: Config) -> bool:
        """Every round and Stage-2 iteration ``cfg`` asks for is done."""
        return self.phase == "done" and self.rounds_done == cfg.stage1.rounds and self.step2 == cfg.stage2.iterations

    def resumed(self, cfg: Config) -> Progress:
        """Where a run saved at this point goes on under ``cfg``: more rounds asked for go
        back to Stage 1 (Stage 2 then starts over); a finished Stage 2 trains on."""
        if self.phase in ("stage2", "done") and self.rounds_done < cfg.stage1.rounds:
            return dataclasses.replace(self, phase="round", phase_step=0, step2=0)
        if self.phase == "done":
            return dataclasses.replace(self, phase="stage2", phase_step=self.step2)
        return self


def lr_for_world(lr: float, rule: LrScaling, world_size: int) -> float:
    """``dist.lr_scaling``: gradients are averaged over ranks, the global batch grows with them."""
    factors = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}
    assert set(factors) == set(get_args(LrScaling)), "every dist.lr_scaling choice has a factor"
    if rule not in factors:
        raise ValueError(f"dist.lr_scaling={rule!r}: use {', '.join(factors)}")
    return lr * factors[rule]


@dataclasses.dataclass
class Stage2State:
    """Ψ and what it trains on, from the last extraction's K clusters."""

    psi: LandmarkNet
    optimizer: torch.optim.Optimizer
    table: LabelTable
    centroids: np.ndarray  # (K, D) landmark centroids in descriptor space
    flip_permutation: np.ndarray  # (K,) landmark ↔ its mirror image

    @staticmethod
    def optimizer_for(psi: LandmarkNet, cfg: Config, world_size: int) -> torch.optim.Optimizer:
        """RMSprop with two groups, the backbone's and the head's (``stage2.backbone_lr_scale``)."""
        lr2 = lr_for_world(cfg.stage2.lr, cfg.dist.lr_scaling, world_size)
        return rmsprop([{"params": psi.backbone.parameters()}, {"params": psi.head.parameters()}],
                       lr=lr2, weight_decay=cfg.stage2.weight_decay)

    @classmethod
    def from_labels(cls, final: RoundLabels, phi: KeypointNet, cfg: Config, info: DistInfo) -> Stage2State:
        """Stage 2 starting: Ψ initialised from Φ, labelled by the final clustering."""
        psi = place(LandmarkNet.from_keypoint_net(phi, cfg.cluster.K), info.device, cfg.memory_format)
        return cls(psi, cls.optimizer_for(psi, cfg, info.world_size), LabelTable.from_round(final),
                   np.array(final.centroids, np.float32), np.array(final.flip_permutation, np.int64))

    @classmethod
    def from_checkpoint(cls, ck: dict, cfg: Config, info: DistInfo, phase_step: int) -> Stage2State:
        """Stage 2 resumed: Ψ's weights, and its optimiser's once it has stepped."""
        psi = place(LandmarkNet(cfg.model, cfg.cluster.K), info.device, cfg.memory_format)
        psi.load_state_dict(ck["psi"])
        optimizer = cls.optimizer_for(psi, cfg, info.world_size)
        if "optimizer2" in ck and phase_step > 0:
            optimizer.load_state_dict(ck["optimizer2"])
        return cls(psi, optimizer, LabelTable.from_state(ck["stage2_labels"]), ck["centroids"].numpy(),
                   ck["flip_permutation"].numpy())

    def to_checkpoint(self) -> dict:
        return {"stage2_labels": self.table.state(), "centroids": torch.from_numpy(self.centroids),
                "flip_permutation": torch.from_numpy(self.flip_permutation), "psi": self.psi.state_dict(),
                "optimizer2": self.optimizer.state_dict()}


@dataclasses.dataclass
class RunState:
    """Everything a resumed run needs to continue at the same batch."""

    progress: Progress
    phi: KeypointNet
    optimizer: torch.optim.Optimizer
    table: LabelTable  # the pseudo-labels Φ trains on (the generic keypoints in the warm-up)
    centroids_m: torch.Tensor | None = None  # the last round's M centroids
    stage2: Stage2State | None = None
    saved_stage2: dict | None = None  # a checkpoint's Stage-2 part, until Stage 2 resumes from it

    @staticmethod
    def _phi(cfg: Config, info: DistInfo) -> tuple[KeypointNet, torch.optim.Optimizer]:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        phi = place(KeypointNet(cfg.model), info.device, cfg.memory_format)
        lr1 = lr_for_world(cfg.stage1.lr, cfg.dist.lr_scaling, info.world_size)
        return phi, rmsprop(phi.parameters(), lr=lr1, weight_decay=cfg.stage1.weight_decay)

    @classmethod
    def fresh(cls, cfg: Config, info: DistInfo, table: LabelTable) -> RunState:
        phi, optimizer = cls._phi(cfg, info)
        return cls(Progress(), phi, optimizer, table)

    @classmethod
    def from_checkpoint(cls, ck: dict, cfg: Config, info: DistInfo) -> RunState:
        """The state saved in ``ck``, moved on to where ``cfg`` says the run continues."""
        phi, optimizer = cls._phi(cfg, info)
        phi.load_state_dict(ck["phi"])
        optimizer.load_state_dict(ck["optimizer"])  # its lr is set by the schedule at every step
        progress = Progress(**ck["progress"]).resumed(cfg)
        saved_stage2 = ck if progress.phase == "stage2" else None
        return cls(progress, phi, optimizer, LabelTable.from_state(ck["labels"]), ck.get("centroids_m"),
                   saved_stage2=saved_stage2)

    def to_checkpoint(self, cfg: Config, world_size: int, data_digest: str) -> dict:
        ck = {"phi": self.phi.state_dict(), "optimizer": self.optimizer.state_dict(), "labels": self.table.state(),
              "progress": dataclasses.asdict(self.progress), "step": self.progress.step,
              "round": self.progress.rounds_done, "world_size": world_size, "config": dataclasses.asdict(cfg),
              "data_digest": data_digest}
        if self.centroids_m is not None:
            ck["centroids_m"] = self.centroids_m
        if self.stage2 is not None:
            ck.update(self.stage2.to_checkpoint())
        return ck

    def advance(self, phase_step: int, global_step: int) -> None:
        """After an optimiser step of the current phase (Stage 2 counts its own steps)."""
        counter = "step2" if self.progress.phase == "stage2" else "step"
        self.progress = dataclasses.replace(self.progress, phase_step=phase_step, **{counter: global_step})


class CheckpointManager:
    """``<run_dir>/checkpoint.pt``: written by rank 0 (atomically, the previous one kept),
    resumed from by every rank."""

    def __init__(self, cfg: Config, info: DistInfo, data_digest: str) -> None:
        self.cfg, self.info, self.data_digest = cfg, info, data_digest
        self.path = Path(cfg.run_dir) / "checkpoint.pt"

    def save(self, state: RunState) -> None:
        if self.info.is_main:
            save_checkpoint(self.path, state.to_checkpoint(self.cfg, self.info.world_size, self.data_digest),
                            keep_previous=True)

    def save_model(self, state: RunState) -> None:
        """``model.pt``: the finished models, what detect, evaluate and export load."""
        if self.info.is_main:
            s2 = state.stage2
            save_checkpoint(Path(self.cfg.run_dir) / "model.pt", {
                "psi": s2.psi.state_dict(), "phi": state.phi.state_dict(), "centroids": torch.from_numpy(s2.centroids),
                "flip_permutation": torch.from_numpy(s2.flip_permutation), "num_landmarks": self.cfg.cluster.K,
                "stage2_labels": s2.table.state(), "step": state.progress.step2,
                "config": dataclasses.asdict(self.cfg)})

    def resume_point(self, shard_dir: Path) -> tuple[dict, Path] | None:
        """The checkpoint to resume from (None: start afresh), refused when the config or
        the data changed in ways it cannot follow."""
        latest = self._chosen()
        if latest is None:
            return None
        ck, used = latest
        changes = incompatible_changes(ck["config"], dataclasses.asdict(self.cfg))
        if changes:
            raise ValueError(f"cannot resume from {used}: the config changed in ways the checkpoint cannot "
                             f"follow ({'; '.join(changes)}); use another run_dir, or --fresh to start over")
        if ck.get("data_digest", self.data_digest) != self.data_digest:
            raise ValueError(f"cannot resume from {used}: {shard_dir} holds other data than the run trained on "
                             f"(content digest {self.data_digest[:12]}, the checkpoint's {ck['data_digest'][:12]}); "
                             f"prepare the original data again, use another run_dir, or --fresh to start over")
        return ck, used

    def _chosen(self) -> tuple[dict, Path] | None:
        """The one rank 0 finds (its latest loadable), read by every rank from that very
        file, so no two ranks resume at different phases."""
        chosen, latest = None, None
        if self.info.is_main:
            latest = load_latest_checkpoint(self.path)
            chosen = None if latest is None else str(latest[1])
        if self.info.world_size > 1:
            chosen = broadcast_json(chosen)
        if chosen is None:
            return None
        if self.info.is_main:
            return latest
        try:
            return load_checkpoint(chosen), Path(chosen)
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.info.where} cannot read the checkpoint rank 0 resumes from ({err})") from None
