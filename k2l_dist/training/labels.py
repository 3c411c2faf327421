"""Pseudo-labels per sample, looked up by stable sample id during training.

Ragged storage: sample ``ids[i]`` owns rows ``offsets[i]:offsets[i+1]`` of ``points``
(crop pixels), ``labels`` (cluster id, or -1 when the point has no cluster yet, as in
warm-up) and ``flipped_labels`` (the label to use when the view is mirrored, Sec. 3.7).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LabelTable:
    ids: np.ndarray  # (N,) int64, sorted
    offsets: np.ndarray  # (N+1,) int64
    points: np.ndarray  # (P, 2) float32
    labels: np.ndarray  # (P,) int64
    flipped_labels: np.ndarray  # (P,) int64

    @classmethod
    def from_points(cls, image_ids: np.ndarray, points: np.ndarray, labels: np.ndarray | None = None,
                    flipped_labels: np.ndarray | None = None, all_ids: np.ndarray | None = None) -> LabelTable:
        """Build from flat per-point arrays (any order); ``all_ids`` adds samples with no point."""
        image_ids = np.asarray(image_ids, np.int64)
        labels = np.full(len(image_ids), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        flipped_labels = labels.copy() if flipped_labels is None else np.asarray(flipped_labels, np.int64)
        order = np.argsort(image_ids, kind="stable")
        ids = np.unique(image_ids if all_ids is None else np.concatenate([image_ids, all_ids]))
        counts = np.bincount(np.searchsorted(ids, image_ids[order]), minlength=len(ids))
        return cls(ids, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   np.asarray(points, np.float32)[order].reshape(-1, 2), labels[order], flipped_labels[order])

    @classmethod
    def from_round(cls, labels) -> LabelTable:
        """A round's :class:`~k2l_dist.clustering.rounds.RoundLabels`, without copying its arrays."""
        return cls(labels.ids, labels.offsets, labels.points, labels.labels, labels.flipped_labels)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @functools.cached_property
    def label_bins(self) -> int:
        """One more than the largest label or flipped label: every label of the table is a
        bin below it (the losses sum per label into fixed bins, known on the host)."""
        top = max(int(self.labels.max(initial=-1)), int(self.flipped_labels.max(initial=-1)))
        return top + 1

    def lookup(self, batch_ids: np.ndarray | torch.Tensor, max_points: int) -> dict[str, torch.Tensor]:
        """Padded (B, P) tensors for a batch of sample ids (unknown ids get no points);
        P = the batch's most points per image, at most ``max_points`` (at least 1): pairs
        and targets scale with P, and a round keeps far fewer points than the warm-up."""
        batch_ids = np.asarray(batch_ids.cpu() if isinstance(batch_ids, torch.Tensor) else batch_ids, np.int64)
        pos = np.clip(np.searchsorted(self.ids, batch_ids), 0, max(len(self.ids) - 1, 0))
        known = (len(self.ids) > 0) & (self.ids[pos] == batch_ids) if len(self.ids) else np.zeros(len(batch_ids), bool)
        starts = self.offsets[pos]
        counts = np.where(known, np.minimum(self.counts[pos] if len(self.ids) else 0, max_points), 0)
        slot = np.arange(max(1, int(counts.max(initial=0))))
        valid = slot[None, :] < counts[:, None]
        rows = np.where(valid, starts[:, None] + slot[None, :], 0)
        if len(self.points) == 0:
            rows = np.zeros_like(rows)
            points = np.zeros((*rows.shape, 2), np.float32)
            labels = np.full(rows.shape, -1, np.int64)
            flipped = labels.copy()
        else:
            points = np.where(valid[..., None], self.points[rows], 0.0).astype(np.float32)
            labels = np.where(valid, self.labels[rows], -1)
            flipped = np.where(valid, self.flipped_labels[rows], -1)
        return {"points": torch.from_numpy(points), "valid": torch.from_numpy(valid),
                "labels": torch.from_numpy(labels), "flipped_labels": torch.from_numpy(flipped)}

    def state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(getattr(self, k)))  # a copy: round arrays may be read-only
                for k in ("ids", "offsets", "points", "labels", "flipped_labels")}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> LabelTable:
        return cls(**{k: v.numpy() for k, v in state.items()})
