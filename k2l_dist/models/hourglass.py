"""Hourglass networks Φ (keypoints + descriptors) and Ψ (K landmark heatmaps).

Paper Sec. 3.2 / 4.2: the Hourglass of Newell et al. with the multi-scale residual
block of Bulat & Tzimiropoulos (the FAN design), 256×256 input, 64×64 outputs. The
backbone is identical for Φ and Ψ so that Ψ can be initialised from Φ.

Deviations from FAN, on purpose:

* GroupNorm instead of BatchNorm: statistics do not depend on the per-GPU batch, so
  DDP needs no SyncBatchNorm and eval equals train behaviour.
* Average pooling for downsampling (smooth, no argmax routing).
* With ``stacks > 1`` the stacks are chained by FAN's 1×1 feature re-injection but
  there is no intermediate supervision: only the last stack feeds the heads.

Conventions: input ``(B, 3, H, W)`` RGB in ``[0, 1]``; outputs at stride 4, i.e.
``(H/4, W/4)``, with the pixel-centre mapping of :mod:`k2l_dist.models.points`.
The input is normalised inside the model with the ImageNet mean/std, so callers
never normalise themselves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from k2l_dist.config import ModelConfig

#: Output stride of every network here (7×7 stride-2 stem conv, then one 2× pool).
STRIDE = 4

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # Narrow layers (c/4 branches of a small model) may have fewer channels than
    # cfg.groups; the gcd keeps the group count a divisor of the channel count.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvBlock(nn.Module):
    """Multi-scale residual block (Bulat & Tzimiropoulos): pre-activation 3×3 convs
    with ``out/2``, ``out/4``, ``out/4`` channels, concatenated, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        if out_ch % 4:
            raise ValueError(f"ConvBlock needs out_ch divisible by 4, got {out_ch}")
        half, quarter = out_ch // 2, out_ch // 4
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, half, 3, padding=1, bias=False)
        self.norm2 = _norm(half, groups)
        self.conv2 = nn.Conv2d(half, quarter, 3, padding=1, bias=False)
        self.norm3 = _norm(quarter, groups)
        self.conv3 = nn.Conv2d(quarter, quarter, 3, padding=1, bias=False)
        self.skip: nn.Module
        if in_ch != out_ch:
            self.skip = nn.Sequential(
                _norm(in_ch, groups), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out_ch, 1, bias=False)
            )
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place on tensors this block made: the same values without a copy each (2% of a
        # CPU step at the paper's size, BENCHMARKS.md)
        out1 = self.conv1(F.relu(self.norm1(x), inplace=True))
        out2 = self.conv2(F.relu(self.norm2(out1), inplace=True))
        out3 = self.conv3(F.relu(self.norm3(out2), inplace=True))
        return torch.cat([out1, out2, out3], dim=1).add_(self.skip(x))


def _blocks(channels: int, count: int, groups: int) -> nn.Sequential:
    return nn.Sequential(*[ConvBlock(channels, channels, groups) for _ in range(count)])


class Hourglass(nn.Module):
    """One hourglass module of ``depth`` levels; each level halves the resolution."""

    def __init__(self, depth: int, channels: int, blocks: int, groups: int) -> None:
        super().__init__()
        self.skip = _blocks(channels, blocks, groups)
        self.down = _blocks(channels, blocks, groups)
        self.inner: nn.Module = (
            Hourglass(depth - 1, channels, blocks, groups) if depth > 1 else _blocks(channels, blocks, groups)
        )
        self.up = _blocks(channels, blocks, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        low = self.up(self.inner(self.down(F.avg_pool2d(x, 2))))
        # Upsample to the skip's exact size so odd feature sizes still add up.
        return skip + F.interpolate(low, size=skip.shape[-2:], mode="nearest")


class Backbone(nn.Module):
    """Stem (stride 4) followed by ``cfg.stacks`` hourglasses; ``(B,3,H,W) -> (B,width,H/4,W/4)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w, g = cfg.width, cfg.groups
        if w % 8:
            raise ValueError(f"model.width must be a multiple of 8, got {w}")
        if cfg.depth < 1 or cfg.stacks < 1 or cfg.blocks < 1:
            raise ValueError("model.depth, model.stacks and model.blocks must be >= 1")
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        # FAN stem with channels scaled to the width (paper width 256: 64 -> 128 -> 256).
        self.stem = nn.Sequential(
            nn.Conv2d(3, w // 4, 7, stride=2, padding=3, bias=False),
            _norm(w // 4, g),
            nn.ReLU(inplace=True),
            ConvBlock(w // 4, w // 2, g),
            nn.AvgPool2d(2),
            ConvBlock(w // 2, w // 2, g),
            ConvBlock(w // 2, w, g),
        )
        self.hourglasses = nn.ModuleList(Hourglass(cfg.depth, w, cfg.blocks, g) for _ in range(cfg.stacks))
        self.post = nn.ModuleList(
            nn.Sequential(
                ConvBlock(w, w, g),
                nn.Conv2d(w, w, 1, bias=False),
                _norm(w, g),
                nn.ReLU(inplace=True),
            )
            for _ in range(cfg.stacks)
        )
        # Re-injection of each non-final stack's features into the next stack's input.
        self.merge = nn.ModuleList(nn.Conv2d(w, w, 1) for _ in range(cfg.stacks - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem((images - self.mean) / self.std)
        for i, (hg, post) in enumerate(zip(self.hourglasses, self.post)):
            feat = post(hg(x))
            if i < len(self.merge):
                x = x + self.merge[i](feat)
        return feat


HEATMAP_BIAS = -4.0  # sigmoid(-4) ≈ 0.018


class KeypointNet(nn.Module):
    """Φ: shared backbone, a 1-channel detector head Φd and a descriptor head Φf.

    ``forward(images (B,3,H,W) in [0,1] RGB) -> (heatmap (B,1,H/4,W/4) in (0,1),
    descriptors (B,d,H/4,W/4) raw, not normalised)``.
    """

    stride: int = STRIDE

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.detector = nn.Conv2d(cfg.width, 1, 1)
        self.descriptor = nn.Conv2d(cfg.width, cfg.descriptor_dim, 1)
        # Targets are mostly 0: start the sigmoid near 0, not 0.5, where MSE gradients vanish.
        nn.init.constant_(self.detector.bias, HEATMAP_BIAS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.backbone(images)
        return torch.sigmoid(self.detector(feat)), self.descriptor(feat)


class LandmarkNet(nn.Module):
    """Ψ: the same backbone with a K-channel heatmap head.

    ``forward(images (B,3,H,W) in [0,1] RGB) -> heatmaps (B,K,H/4,W/4) in (0,1)``.
    The sigmoid keeps heatmaps positive, which the log-quadratic peak refinement of
    :func:`~k2l_dist.models.points.heatmap_peaks` relies on.
    """

    stride: int = STRIDE

    def __init__(self, cfg: ModelConfig, num_landmarks: int) -> None:
        super().__init__()
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        self.cfg = cfg
        self.num_landmarks = num_landmarks
        self.backbone = Backbone(cfg)
        out = nn.Conv2d(cfg.descriptor_dim if cfg.psi_head == "descriptor" else cfg.width, num_landmarks, 1)
        nn.init.constant_(out.bias, HEATMAP_BIAS)
        # psi_head=descriptor: Φ's descriptor layer before the K heatmaps (filled by from_keypoint_net)
        self.head = nn.Sequential(nn.Conv2d(cfg.width, cfg.descriptor_dim, 1), out) \
            if cfg.psi_head == "descriptor" else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.backbone(images)))

    @classmethod
    def from_keypoint_net(cls, phi: KeypointNet, num_landmarks: int) -> LandmarkNet:
        """Ψ initialised from Φ (paper Sec. 4.2): the whole backbone is copied (with
        ``model.psi_head=descriptor`` Φ's descriptor layer too); the K-channel output layer,
        the only one Φ does not have, is freshly initialised."""
        psi = cls(phi.cfg, num_landmarks)
        ref = next(phi.parameters())
        psi.to(device=ref.device, dtype=ref.dtype)
        psi.backbone.load_state_dict(phi.backbone.state_dict())
        if phi.cfg.psi_head == "descriptor":
            psi.head[0].load_state_dict(phi.descriptor.state_dict())
        return psi


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
