"""SuperPoint (DeTone, Malisiewicz & Rabinovich, CVPRW 2018): the paper's initial keypoints.

The network is the published architecture: a VGG-style encoder on a grayscale image
(64-64-pool-64-64-pool-128-128-pool-128-128, 3x3 convolutions and ReLUs), a detector
head giving 65 channels per 8x8 cell (64 pixel positions + a "no keypoint" dustbin)
turned into a full-resolution score map by softmax and depth-to-space, and a
descriptor head giving a coarse 256-d map that is L2-normalised and interpolated at
the keypoints. Parameters carry the names of the publicly released pretrained state
dict (``conv1a`` ... ``conv4b``, ``convPa``/``convPb``, ``convDa``/``convDb``), so such
a file loads with :func:`load_superpoint`. No weights ship and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from k2l_dist.keypoints.anms import anms

CELL = 8  # the detector head predicts one 8x8 cell per coarse position
DESCRIPTOR_DIM = 256


class SuperPoint(nn.Module):
    """SuperPoint network; input (B, 1, H, W) grayscale in [0, 1], H and W multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = 64, 64, 128, 128, 256

        def conv3(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)

        self.conv1a, self.conv1b = conv3(1, c1), conv3(c1, c1)
        self.conv2a, self.conv2b = conv3(c1, c2), conv3(c2, c2)
        self.conv3a, self.conv3b = conv3(c2, c3), conv3(c3, c3)
        self.conv4a, self.conv4b = conv3(c3, c4), conv3(c4, c4)
        self.convPa = conv3(c4, c5)
        self.convPb = nn.Conv2d(c5, CELL * CELL + 1, kernel_size=1)
        self.convDa = conv3(c4, c5)
        self.convDb = nn.Conv2d(c5, DESCRIPTOR_DIM, kernel_size=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) → score map (B, H, W) in [0, 1] and unit-norm coarse descriptors (B, 256, H/8, W/8)."""
        x = image
        for a, b in ((self.conv1a, self.conv1b), (self.conv2a, self.conv2b), (self.conv3a, self.conv3b)):
            x = F.max_pool2d(F.relu(b(F.relu(a(x)))), kernel_size=2, stride=2)
        x = F.relu(self.conv4b(F.relu(self.conv4a(x))))
        logits = self.convPb(F.relu(self.convPa(x)))
        # Softmax over the 64 positions + dustbin, then drop the dustbin; channel
        # i*8+j is row offset i, column offset j within the cell (pixel_shuffle order).
        prob = logits.softmax(dim=1)[:, :-1]
        scores = F.pixel_shuffle(prob, CELL)[:, 0]
        desc = F.normalize(self.convDb(F.relu(self.convDa(x))), p=2, dim=1)
        return scores, desc


def sample_descriptors(coarse: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly interpolate a (1, D, Hc, Wc) coarse map at (N, 2) pixel-centre (x, y) points → (N, D), unit norm.

    Coarse cell c covers pixels 8c .. 8c+7, so its value sits at pixel centre 8c + 3.5.
    """
    _, dim, hc, wc = coarse.shape
    if len(points) == 0:
        return coarse.new_zeros((0, dim))
    u = (points[:, 0] - (CELL - 1) / 2) / CELL
    v = (points[:, 1] - (CELL - 1) / 2) / CELL
    # align_corners=True: -1 and 1 are the centres of the first and last cells.
    gx = u / max(wc - 1, 1) * 2 - 1
    gy = v / max(hc - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).view(1, 1, -1, 2).to(coarse.dtype)
    out = F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return F.normalize(out[0, :, 0].t(), p=2, dim=1)


def _simple_nms(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """Keep a score only where it is the maximum of its (2r+1)^2 window; others become 0."""
    if radius <= 0:
        return scores
    pooled = F.max_pool2d(scores[None, None], kernel_size=2 * radius + 1, stride=1, padding=radius)[0, 0]
    return torch.where(scores == pooled, scores, torch.zeros_like(scores))


@torch.inference_mode()
def superpoint_detect(
    model: SuperPoint,
    gray: np.ndarray,
    count: int,
    candidates: int,
    nms_radius: int = 4,
    border: int = 4,
    threshold: float = 0.005,
) -> tuple[np.ndarray, np.ndarray]:
    """Score map → NMS → top ``candidates`` above ``threshold`` → ANMS to ``count`` → descriptors.

    ``gray`` is a (H, W) uint8 image. Returns (N, 2) float32 pixel-centre (x, y) points
    and (N, 256) float32 unit-norm descriptors. The ``border`` pixels next to the image
    edge are ignored (the receptive field sees padding there), as in the SuperPoint paper.
    """
    h, w = gray.shape
    empty = np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_DIM), np.float32)
    if h == 0 or w == 0 or count <= 0:
        return empty
    device = next(model.parameters()).device
    image = torch.from_numpy(np.ascontiguousarray(gray)).to(device=device, dtype=torch.float32) / 255.0
    # Pad to a multiple of the cell size; replicate so the padding adds no fake edge.
    ph, pw = (-h) % CELL, (-w) % CELL
    image = image[None, None]
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), mode="replicate")
    scores, coarse = model(image)
    scores = _simple_nms(scores[0, :h, :w], nms_radius)
    if border > 0:
        valid = torch.zeros_like(scores, dtype=torch.bool)
        valid[border : h - border, border : w - border] = True
        scores = torch.where(valid, scores, torch.zeros_like(scores))
    flat = scores.reshape(-1)
    above = torch.nonzero(flat > threshold).reshape(-1)
    if len(above) == 0:
        return empty
    top = torch.topk(flat[above], k=min(candidates, len(above))).indices
    idx = above[top]
    resp = flat[idx].double().cpu().numpy()
    pts = np.stack([(idx % w).cpu().numpy(), (idx // w).cpu().numpy()], axis=1).astype(np.float32)
    keep = anms(pts, resp, count)
    pts = pts[keep]
    desc = sample_descriptors(coarse, torch.from_numpy(pts).to(device))
    return pts, desc.float().cpu().numpy()


def load_superpoint(path: str | Path) -> SuperPoint:
    """Load a SuperPoint state dict (e.g. the released ``superpoint_v1.pth``) onto the CPU, in eval mode.

    Only tensors are unpickled (``weights_only=True``). A ``module.`` prefix (from
    DataParallel) is stripped. Raises FileNotFoundError for a missing file and
    ValueError, naming the file, for anything that is not a matching state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SuperPoint weights not found: {path}")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # corrupt file or pickled non-tensor objects
        raise ValueError(f"{path}: not a loadable SuperPoint state dict ({type(err).__name__}: {err})") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: expected a state dict (str → tensor), got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}

    model = SuperPoint()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a SuperPoint state dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    bad = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} != {tuple(v.shape)}"
        for k, v in expected.items()
        if not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{path}: SuperPoint weights of the wrong shape: {bad[:5]}")
    model.load_state_dict(state, strict=True)
    return model.eval()
