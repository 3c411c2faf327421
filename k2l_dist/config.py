"""The one typed configuration of k2l-dist.

Every component owns a small dataclass; :class:`Config` nests them. Values come, in
order of precedence, from the dataclass defaults, a YAML file (``configs/*.yaml``),
and ``key=value`` overrides on the command line (``stage1.rounds=3``). Unknown keys
and values of the wrong type are errors that name the dotted key. The resolved
config is written next to every run's outputs (:func:`save_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# The choices of every string setting that has a fixed set, written once: the loader refuses
# other values (naming the key and the choices), and the code that branches on them reads
# them from here (typing.get_args).
DataFormat = Literal["synthetic", "folder", "mtfl", "lsp", "lspet", "pts", "mafl", "aflw",
                     "video", "penn_action", "bbcpose", "human36m", "synthetic_video"]
CropBox = Literal["whole", "landmarks", "file"]
KeypointMethod = Literal["orb", "sift", "superpoint", "none"]
PsiHead = Literal["conv", "descriptor"]
Negatives = Literal["same_image", "different_clusters"]
Correspondence = Literal["clustering", "equivariance"]
LossBalance = Literal["separate", "official"]
KMeansInit = Literal["kmeans++", "random", "afkmc2"]
ServiceChoice = Literal["auto", "ray", "inline"]
NormChoice = Literal["auto", "interocular", "box"]
CenterChoice = Literal["dataset", "input", "none"]
SplitChoice = Literal["random", "last", "file", "protocol", "pattern"]  # k2l_dist/eval/split.py says what each does
LrScaling = Literal["none", "linear", "sqrt"]
Precision = Literal["fp32", "bf16"]
MemoryFormat = Literal["contiguous", "channels_last"]
CompileBackend = Literal["", "inductor", "eager", "aot_eager", "cudagraphs"]


@dataclass
class DataConfig:
    """Where the images come from and how `k2l prepare` turns them into shards."""

    format: DataFormat = "synthetic"
    root: str = ""  # dataset root; annotation paths are relative to it
    # mtfl, aflw: MTFL training.txt; mafl: CelebA list_landmarks_align_celeba.txt; lsp, lspet: joints.mat
    annotations: str = ""
    # The dataset's own test list, recorded in the shards for eval.split=protocol.
    # mafl: MAFL testing.txt (image names); aflw: MTFL testing.txt (its AFLW/ lines are the test faces)
    test_list: str = ""
    train_list: str = ""  # mafl: MAFL training.txt (the images the regressors are fitted on)
    partition_file: str = ""  # mafl: CelebA's list_eval_partition.txt: only its training partition trains
    shards: str = ""  # folder of prepared shards; empty = <run_dir>/shards
    # data.shards is a path on each node's own disk: the first process of every node that
    # lacks it prepares it there (the nodes' copies must agree, checked by content digest)
    local_shards: bool = False
    size: int = 128  # side of the square crop written to the shards, pixels
    box: CropBox = "whole"
    box_scale: float = 2.2  # side of a landmark/file box relative to its longer side
    box_file: str = ""  # lines "relative/path x y w h" (original pixels) for box=file
    samples_per_shard: int = 1000
    limit: int = 0  # keep at most this many images (0 = all)
    strict: bool = False  # bad input is an error instead of a counted skip
    workers: int = 2  # processes decoding/cropping/detecting during prepare
    jpeg_quality: int = 95
    synthetic_count: int = 2000  # images drawn when format=synthetic (videos when synthetic_video)
    synthetic_frames: int = 24  # frames per clip when format=synthetic_video
    synthetic_seed: int = 0
    synthetic_render_size: int = 0  # side the synthetic images are drawn at before cropping (0 = size)
    synthetic_object_scale: float = 1.0  # > 1 draws larger objects relative to the frame
    pts_one_based: bool = True  # 300-W .pts files count pixels from 1
    # video formats: keep one training frame in N; 0 = the format's protocol
    # (bbcpose: 10, human36m: 50 (its test subject: 100 always), video, penn_action: 1)
    frame_every: int = 0


@dataclass
class KeypointConfig:
    """Generic keypoints that bootstrap Stage 1 (paper Sec. 3.1, 5.1)."""

    method: KeypointMethod = "orb"  # none: inference-only shards
    count: int = 50  # keypoints kept per image by ANMS
    candidates: int = 1000  # raw detections handed to ANMS
    superpoint_weights: str = ""  # path to a SuperPoint state dict (none ship)
    outlier_fraction: float = 0.4  # share of keypoints dropped as outliers (paper: 0.4)
    outlier_neighbours: int = 10  # neighbours in the outlier median-distance score
    outlier_reference: int = 20000  # descriptors sampled as the neighbour reference (exact search cost ∝ this)
    min_keypoints: int = 2  # fewer than this after detection: the image is skipped


@dataclass
class TemporalConfig:
    """Temporal supervision on video shards (paper Sec. 4.2): some Stage-1 pairs show two
    nearby frames of one video instead of two augmentations of one image; the first
    frame's points are tracked into the second with pyramidal Lucas-Kanade, and a track
    that fails the forward-backward check is left out. Still-image shards ignore this."""

    share: float = 0.5  # share of the pairs drawn from two frames (0 = off, the paper's default for stills)
    window: int = 3  # the second frame is at most this many prepared frames from the first
    fb_max_px: float = 0.5  # largest forward-backward tracking error kept, crop pixels
    lk_window: int = 21  # Lucas-Kanade window side, crop pixels


@dataclass
class AugmentConfig:
    """The DALI augmentation of training views; ranges follow the paper's code."""

    enabled: bool = True  # False: identity views (extraction / evaluation)
    size: int = 0  # side of the views fed to the network; 0 = the shards' size
    rotation: float = 40.0  # degrees, uniform in [-rotation, rotation]
    scale_min: float = 0.8
    scale_max: float = 1.2
    translation: float = 0.05  # fraction of the side, uniform in [-t, t]
    flip_prob: float = 0.5  # horizontal flip
    shared_flip: bool = True  # both views of a pair mirrored together (consistent same-point positives)
    brightness: float = 0.2  # multiplicative delta, uniform in [1-b, 1+b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 10.0  # degrees
    blur_prob: float = 0.2
    blur_sigma_max: float = 1.5
    noise_std: float = 0.02  # Gaussian pixel noise, fraction of 255
    batch_size: int = 16
    num_threads: int = 0  # DALI threads; 0 = dist.threads (cores / local world size)
    prefetch: int = 2
    shuffle_buffer: int = 1024  # samples in the reader's shuffle buffer (per rank)
    strict: bool = False  # a bad sample in a shard is an error instead of a counted skip


@dataclass
class ModelConfig:
    """Hourglass backbone shared by Φ (detector + descriptor heads) and Ψ (K heatmaps)."""

    width: int = 256  # channels in the hourglass (paper: 256)
    depth: int = 4  # hourglass levels (each halves the resolution)
    stacks: int = 1
    descriptor_dim: int = 256
    groups: int = 32  # GroupNorm groups (capped per layer at gcd(groups, channels))
    # Ψ's head: conv = a fresh 1×1 convolution on the backbone; descriptor = Φ's descriptor
    # layer (copied from Φ) then a fresh 1×1 convolution to the K heatmaps, as the paper's
    # code keeps Φ's descriptor branch and retrains its last layer only
    psi_head: PsiHead = "conv"
    blocks: int = 1  # ConvBlocks per hourglass branch and level (FAN: 1)


# Radii are given in pixels of a 64×64 heatmap (the paper's: 256-px images, stride 4) and
# scaled to the heatmap a config trains (a 128-px crop: 32×32, half of them).
RADIUS_REFERENCE = 64


@dataclass
class LossConfig:
    """Stage-1/2 losses (paper Sec. 3.4, 3.6, 5.2). Radii: pixels of a 64² heatmap (``RADIUS_REFERENCE``)."""

    heatmap_sigma: float = 1.0  # Gaussian σ of detector / landmark targets
    margin: float = 1.0  # hinge margin m on squared distances of unit descriptors, in [0, 4]
    neg_weight: float = 1.0  # weight of the mean negative term vs the mean positive term
    negatives: Negatives = "same_image"  # different_clusters: an ablation (Table 3)
    correspondence: Correspondence = "clustering"  # equivariance: an ablation (Table 3)
    random_negatives: int = 32  # random-location negatives per view and image (same_image)
    # random negatives at least this far from every labelled point (the official code: 5.7)
    min_neg_distance: float = 5.7
    # two detections of one image closer than this are not pushed apart as negatives: they
    # are likely the same part found twice (the official code drops pairs closer than 5.7)
    point_neg_min_distance: float = 5.7
    # ignore the part of a crop that lies outside its image (repeated border pixels): no
    # detections, random negatives or heatmap loss there
    mask_padding: bool = True
    # an image without pseudo-labels this round is left out of the detector loss; False
    # trains its heatmap towards zero (an ablation of that choice)
    sit_out_unlabelled: bool = True
    # separate: detector MSE (mean of the views) + mean positive + neg_weight × mean negative;
    # official: the paper's code's balance: 10 × one mean over all pairs, the negatives'
    # hinge on the distance (not its square) squared, + the two views' detector MSE summed
    balance: LossBalance = "separate"


@dataclass
class Stage1Config:
    """Self-training of Φ (paper Alg. 1; iterations from Sec. 4.2)."""

    warmup_iters: int = 30000  # bootstrapping on known correspondences (Sec. 3.5)
    rounds: int = 34  # T: clustering rounds after warm-up
    iters_per_round: int = 5000  # N_iters between clusterings
    lr: float = 2e-4  # RMSprop
    weight_decay: float = 1e-5
    # Stage-1 iterations (warm-up included) at which the learning rate is multiplied by
    # lr_gamma; the official code steps down at 150k and 180k of 200k.
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    max_points: int = 64  # pseudo-label slots looked up per image (≥ K and ≥ keypoints.count)
    # Every NMS peak above detect_threshold goes to clustering; this is only a safety cap
    # per image (0 = 3 × cluster.K), and a round reports how many images reached it.
    extract_points: int = 0
    detect_threshold: float = 0.05  # detector confidence a peak must exceed
    nms_radius: float = 2.0  # pixels of a 64² heatmap (the official ±2 box); at least 1 heatmap pixel
    subpixel: bool = True  # refine peaks to sub-pixel positions (log-quadratic fit)
    flip: bool = True  # flip correspondence (Sec. 3.7): flipped labels for mirrored views
    # Images per extraction batch (inference only, with its mirror pass in the same forward);
    # 0 = 4 × augment.batch_size
    extract_batch_size: int = 0
    # Share of the images a round re-extracts and clusters (a seeded draw per round); the
    # others keep last round's labels, renumbered into the new clusters. The first round
    # and the last always extract every image. 1 = every image every round (Alg. 1).
    extract_fraction: float = 1.0


@dataclass
class Stage2Config:
    """The K-heatmap landmark detector Ψ (Sec. 3.6)."""

    iterations: int = 30000
    lr: float = 2e-4
    weight_decay: float = 1e-5
    lr_milestones: tuple[int, ...] = ()  # Stage-2 iterations where lr ×= lr_gamma (official: 50k, 70k)
    lr_gamma: float = 0.1
    backbone_lr_scale: float = 1.0  # Ψ's backbone trains at lr × this (official code: 0.1)
    flip_train: bool = True  # mirrored training views with the K↔K flip permutation
    flip_test: bool = True  # average with the channel-permuted heatmaps of the mirrored image
    # Cutout on Ψ's training views (the official code: an 80-px square of a 256-px image,
    # half the time): the square's side as a share of the view, 0 = off
    cutout: float = 0.0
    cutout_prob: float = 0.5


@dataclass
class ClusterConfig:
    """Clustering of Stage-1 descriptors (paper Sec. 3.3, 4.2: M = 100 for all datasets)."""

    K: int = 10  # landmarks per image (first pass / Stage-2 clusters)
    M: int = 100  # over-segmentation clusters (second pass); paper: 100
    # Fit the centroids on the original and the mirrored images' descriptors together (the
    # paper's code does); only the originals are labelled and deduplicated either way.
    mirror_together: bool = True
    niter: int = 25  # Lloyd iterations per run (faiss default)
    nredo: int = 8  # K-means restarts with distinct seeds; the lowest objective wins
    # Centroid seeding: kmeans++ | random (faiss' default) | afkmc2. With well-separated
    # landmark clusters, random seeding often puts two centroids in one cluster, which
    # Lloyd iterations cannot undo (two landmarks merge, a centroid sits on background
    # points). faiss < 1.12-ish has only random: we warn and fall back.
    init: KMeansInit = "kmeans++"
    # faiss trains on a random subsample of k * max_points_per_centroid points when n is
    # larger (faiss default 256). 0 = no cap: train on every point.
    max_points_per_centroid: int = 256
    seed: int = 0  # faiss RNG (initialisation, subsampling, empty-cluster splits)
    use_gpu: bool = False  # faiss GPU when the installed faiss sees GPUs, else CPU
    min_points_per_image: int = 2  # images with fewer kept points sit out the round
    verbose: bool = False  # faiss per-iteration log
    # Where a round's clustering runs. ray: a Ray actor fed through the object store
    # (joins RAY_ADDRESS, else starts a local Ray); inline: gathered to rank 0 over the
    # process group; auto: ray when several processes train, inline for one.
    service: ServiceChoice = "auto"
    shards: int = 1  # descriptor shard actors (ray); > 1 spreads one round's descriptors over nodes
    actor_restarts: int = 1  # times a dead clustering actor is recreated and its round redone
    # A custom Ray resource only the clustering nodes offer (cluster.yaml: k2l_cluster): the
    # actor and its shard holders are placed on those nodes.
    actor_resource: str = ""
    actor_cpus: int = 0  # CPUs Ray reserves for the actor and each shard holder; 0 = a node's free CPUs
    actor_memory_gb: float = 0.0  # memory Ray reserves for the actor and each holder; 0 = none reserved
    threads: int = 0  # Faiss threads inside the actor and holders; 0 = the CPUs each was given
    object_store_gb: float = 0.0  # object store of a locally started Ray; 0 = 30% of memory
    round_timeout_s: float = 3600.0  # longest wait for a round's labels before the job fails


@dataclass
class EvalConfig:
    """Landmark evaluation (paper Sec. 4.2, 6); every field has a usable default."""

    # Ridge strength *relative to* the mean diagonal of XᵀX (so it is unit-free: pixels
    # or [0, 1] coordinates give the same fit). 0 = least squares (minimum-norm).
    ridge_alpha: float = 1e-4
    # Regressor images, drawn by eval.seed from the training split (or from the protocol's
    # training list); 0 = all of them (paper: all for Fig. 9's table, 300 for its curves)
    regressor_train_count: int = 0
    # auto: interocular with the dataset's eye indices (MTFL, synthetic), else box
    norm: NormChoice = "auto"  # interocular: distance of eye_indices | box: sqrt GT box area
    eye_indices: tuple[int, int] = (0, 1)  # MTFL eye centres; shoulders for BBCPose / Human3.6M
    center: CenterChoice = "dataset"  # dataset: training-mean-centred coordinates | input: per-image input centroid
    # Raw-landmark accuracy thresholds in pixels at accuracy_ref_size (paper: 6 px at 128 px)
    accuracy_thresholds: tuple[float, ...] = (6.0,)
    accuracy_ref_size: int = 128
    ced_max: float = 0.0  # x range of CED plots, in NME units; 0 = the largest error plotted
    ced_steps: int = 200
    svt_iters: int = 2000  # Stage-1 matrix completion (Sec. 4.2)
    svt_tol: float = 1e-4
    seed: int = 0  # the random split's held-out ids, and the regressor images when regressor_train_count > 0
    # Held-out test images, never trained on nor used by a regressor (k2l_dist/eval/split.py):
    # random: test_count ids drawn by seed | last: the test_count largest ids | file: the
    # ids or image paths in split_file | protocol: the dataset's own test list (mafl, aflw) |
    # pattern: the images whose path matches split_pattern (a subject's folder: no frame of a
    # held-out subject trains, where a random split would leak near-duplicate frames)
    split: SplitChoice = "random"
    split_file: str = ""  # one sample id or image path per line, for split=file
    split_pattern: str = ""  # a regular expression searched in each image's path, for split=pattern
    test_count: int = 1000  # held-out images for split=random | last (at most half the dataset)


@dataclass
class DistConfig:
    """Processes, threads and timeouts of a torchrun job (one process = one rank)."""

    timeout_s: float = 1800.0  # a collective that waits longer ends the job
    join_timeout_s: float = 60.0  # every rank must join the process group within this at the start
    prepare_timeout_s: float = 86400.0  # how long ranks > 0 wait for rank 0 to prepare the shards
    threads: int = 0  # torch / DALI / Faiss threads per process; 0 = cores / local world size
    # Each rank trains on its own batch of augment.batch_size (the paper's unit: positives
    # across images come from the local batch); gradients are averaged over ranks, so the
    # global batch is world_size × batch_size. The learning rate used is
    # lr × world_size (linear), lr × √world_size (sqrt) or lr (none).
    lr_scaling: LrScaling = "none"


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    precision: Precision = "fp32"  # bf16: autocast of the networks' forward passes (losses stay fp32)
    # the networks' weights and activations in memory: channels_last (NHWC) saves layout
    # reorders around oneDNN / cuDNN convolutions; not faster on this project's CPUs (BENCHMARKS.md)
    memory_format: MemoryFormat = "contiguous"
    # torch.compile of the training networks: "" off, or a backend: inductor (fused kernels,
    # minutes of compiling first: for long GPU runs), eager (tracing only, a quick check)
    compile: CompileBackend = ""
    log_every: int = 25  # iterations between logged losses
    checkpoint_every: int = 1000  # iterations between checkpoints inside a phase (also at every phase end)
    # steps between NaN/inf checks of the losses and gradients: each check waits for the device
    # (a host sync); 1 stops before a bad update, N > 1 within N steps (checkpoint_every a multiple)
    check_finite_every: int = 1
    progress: bool = True  # progress bars on rank 0
    data: DataConfig = field(default_factory=DataConfig)
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# a number in decimal or scientific notation (YAML 1.1, which PyYAML follows, only reads
# exponents with a dot and a sign as floats: 1.0e-3, not 1e-3)
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _choice_problem(value: Any, tp: Any) -> str | None:
    """Why ``value`` is not one of the ``Literal`` ``tp``'s choices (None: it is)."""
    choices = typing.get_args(tp)
    if isinstance(value, str) and value in choices:
        return None
    return f"{value!r} is not one of {', '.join(map(repr, choices))}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        problem = _choice_problem(value, tp)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            raise ConfigError(f"{key}: expected str, got null")
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _merge(obj: Any, values: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``values`` (a nested dict) applied."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(_unknown_key(key, name, names))
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _merge(current, value, f"{key}.")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(obj, **changes)


def _unknown_key(key: str, name: str, names: set[str]) -> str:
    """The message for an unknown key: the nearest known names, else every name at its level."""
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    prefix = key[: len(key) - len(name)]
    if close:
        return f"unknown config key '{key}': did you mean {' or '.join(repr(prefix + c) for c in close)}?"
    elsewhere = sorted(k for k in flatten(config_to_dict(Config())) if k.rsplit(".", 1)[-1] == name)
    if elsewhere:
        return f"unknown config key '{key}': did you mean {' or '.join(map(repr, elsewhere))}?"
    return f"unknown config key '{key}' (known at this level: {', '.join(sorted(names))})"


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` → ``("a.b", 3)``; the value is read as YAML (so ``true``, ``0.5``, ``[1,2]``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    return key, value


def nest_values(pairs: dict[str, Any]) -> dict:
    """``{"a.b": 1, "a.c": 2}`` → ``{"a": {"b": 1, "c": 2}}``."""
    out: dict = {}
    for key, value in pairs.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def apply_values(cfg: Config, values: dict) -> Config:
    """``cfg`` with a nested dict of values applied (validated like a YAML file)."""
    return _merge(cfg, values)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: Config | None = None
) -> Config:
    """Defaults (or ``base``) ← YAML file at ``path`` ← ``key=value`` overrides."""
    cfg = base if base is not None else Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        try:
            cfg = _merge(cfg, values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides:
        key, value = parse_override(text)
        cfg = _merge(cfg, nest_values({key: value}))
    return cfg


def run_config(saved: dict, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A finished run's config (the dict its checkpoint carries) ← YAML file at ``path`` ←
    ``key=value`` overrides: how evaluate, detect and export resolve theirs."""
    cfg = load_config(path, overrides, base=apply_values(Config(), saved))
    validate(cfg)
    return cfg


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"a.b": value}`` (tuples as lists, as YAML keeps them)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def heatmap_radius(value: float, heatmap_side: int) -> float:
    """A radius given in pixels of a ``RADIUS_REFERENCE``² heatmap, in pixels of one ``heatmap_side`` wide."""
    return float(value) * heatmap_side / RADIUS_REFERENCE


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (what every run saves, what --print-config shows)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    from k2l_dist.utils.io import atomic_write_text

    atomic_write_text(Path(path), config_yaml(cfg))


# keys that hold a path: resolved against the working directory before a job starts, so
# every process, node and saved config means the same file whatever its own directory
PATH_KEYS = ("run_dir", "data.root", "data.annotations", "data.test_list", "data.train_list", "data.partition_file",
             "data.shards",
             "data.box_file", "keypoints.superpoint_weights", "eval.split_file")


def absolute_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """``cfg`` with every path key (``PATH_KEYS``) made absolute against ``base`` (default: the
    working directory); empty values stay empty, ``~`` is expanded."""
    base = Path.cwd() if base is None else Path(base)
    values = {}
    for key in PATH_KEYS:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node:
            path = Path(node).expanduser()
            values[key] = os.path.abspath(base / path)
    return apply_values(cfg, nest_values(values))


def validate(cfg: Config) -> None:
    """Refuse, before any work starts, values that cannot work; the error names every key."""
    c, s1, s2 = cfg.cluster, cfg.stage1, cfg.stage2
    device_ok = cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:")
                                                          and cfg.device[5:].isdigit())
    rules = [
        (c.K >= 1, "cluster.K", f"must be >= 1, got {c.K}"),
        (c.M >= c.K, "cluster.M", f"must be >= cluster.K ({c.K}), got {c.M}"),
        (c.min_points_per_image >= 0, "cluster.min_points_per_image", "must be >= 0"),
        (c.shards >= 1, "cluster.shards", f"must be >= 1, got {c.shards}"),
        (c.actor_restarts >= 0, "cluster.actor_restarts", "must be >= 0"),
        (c.actor_cpus >= 0, "cluster.actor_cpus", f"must be >= 0 (0 = a node's free CPUs), got {c.actor_cpus}"),
        (c.actor_memory_gb >= 0, "cluster.actor_memory_gb", f"must be >= 0, got {c.actor_memory_gb}"),
        (s1.warmup_iters >= 0, "stage1.warmup_iters", f"must be >= 0, got {s1.warmup_iters}"),
        (s1.rounds >= 0, "stage1.rounds", f"must be >= 0, got {s1.rounds}"),
        (s1.iters_per_round >= 0, "stage1.iters_per_round", f"must be >= 0, got {s1.iters_per_round}"),
        (s1.lr > 0, "stage1.lr", f"must be > 0, got {s1.lr}"),
        (s1.extract_points >= 0, "stage1.extract_points", "must be >= 0 (0 = 3 × cluster.K)"),
        (s1.extract_batch_size >= 0, "stage1.extract_batch_size", "must be >= 0 (0 = 4 × augment.batch_size)"),
        (0 <= cfg.temporal.share <= 1, "temporal.share", f"must be in [0, 1], got {cfg.temporal.share}"),
        (cfg.temporal.window >= 1, "temporal.window", f"must be >= 1, got {cfg.temporal.window}"),
        (cfg.temporal.fb_max_px > 0, "temporal.fb_max_px", f"must be > 0, got {cfg.temporal.fb_max_px}"),
        (cfg.temporal.lk_window >= 3, "temporal.lk_window", f"must be >= 3, got {cfg.temporal.lk_window}"),
        (0 < s1.extract_fraction <= 1, "stage1.extract_fraction", f"must be in (0, 1], got {s1.extract_fraction}"),
        (s2.iterations >= 0, "stage2.iterations", f"must be >= 0, got {s2.iterations}"),
        (s2.lr > 0, "stage2.lr", f"must be > 0, got {s2.lr}"),
        (cfg.augment.batch_size >= 1, "augment.batch_size", f"must be >= 1, got {cfg.augment.batch_size}"),
        (0 <= cfg.keypoints.outlier_fraction < 1, "keypoints.outlier_fraction",
         f"must be in [0, 1), got {cfg.keypoints.outlier_fraction} (1 would drop every keypoint)"),
        (cfg.data.workers >= 0, "data.workers", f"must be >= 0 (0 or 1: in this process), got {cfg.data.workers}"),
        (cfg.data.limit >= 0, "data.limit", f"must be >= 0 (0 = every image), got {cfg.data.limit}"),
        (cfg.data.frame_every >= 0, "data.frame_every",
         f"must be >= 0 (keep one frame in N; 0 = the format's protocol), got {cfg.data.frame_every}"),
        (cfg.log_every >= 1, "log_every", f"must be >= 1, got {cfg.log_every}"),
        (cfg.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {cfg.checkpoint_every}"),
        (cfg.check_finite_every >= 1, "check_finite_every", f"must be >= 1, got {cfg.check_finite_every}"),
        (cfg.checkpoint_every % max(1, cfg.check_finite_every) == 0, "check_finite_every",
         f"checkpoint_every={cfg.checkpoint_every} must be a multiple of it (a checkpoint is only taken at a "
         f"checked step), got {cfg.check_finite_every}"),
        (device_ok, "device", f"{cfg.device!r} is not auto, cpu, cuda or cuda:N"),
        (0 <= s2.cutout < 1, "stage2.cutout", f"must be in [0, 1) (a share of the view's side), got {s2.cutout}"),
        (cfg.dist.timeout_s > 0, "dist.timeout_s", "must be > 0"),
        (cfg.dist.join_timeout_s > 0, "dist.join_timeout_s", "must be > 0"),
        *_eval_rules(cfg.eval),
        *_choice_rules(cfg),
    ]
    problems = [f"{key}: {why}" for ok, key, why in rules if not ok]
    if problems:
        raise ConfigError("; ".join(problems))


def _choice_rules(obj: Any, prefix: str = "") -> list[tuple[bool, str, str]]:
    """Every ``Literal`` setting of ``obj`` (a config built in Python skips the loader's check)."""
    rules = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rules += _choice_rules(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is Literal:
            problem = _choice_problem(value, hints[f.name])
            rules.append((problem is None, f"{prefix}{f.name}", problem or ""))
    return rules


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _eval_rules(e: EvalConfig) -> list[tuple[bool, str, str]]:
    uses_file = e.split == "file"
    return [
        (not uses_file or bool(e.split_file), "eval.split_file",
         "required when eval.split is 'file' (one sample id or image path per line)"),
        (not uses_file or not e.split_file or Path(e.split_file).is_file(), "eval.split_file",
         f"file not found: {e.split_file}"),
        (not e.split_file or e.split == "file", "eval.split_file",
         f"set, but eval.split is {e.split!r}; set eval.split=file to use it"),
        (e.split != "pattern" or bool(e.split_pattern), "eval.split_pattern",
         "required when eval.split is 'pattern' (a regular expression, e.g. '(^|/)S11/' for a subject)"),
        (not e.split_pattern or e.split == "pattern", "eval.split_pattern",
         f"set, but eval.split is {e.split!r}; set eval.split=pattern to use it"),
        (_compiles(e.split_pattern), "eval.split_pattern", f"not a regular expression: {e.split_pattern!r}"),
        (e.test_count >= 0, "eval.test_count", f"must be >= 0, got {e.test_count}"),
        (e.regressor_train_count >= 0, "eval.regressor_train_count",
         f"must be >= 0 (0 = all training images), got {e.regressor_train_count}"),
        (e.svt_iters >= 1, "eval.svt_iters", f"must be >= 1, got {e.svt_iters}"),
        (e.svt_tol > 0, "eval.svt_tol", f"must be > 0, got {e.svt_tol}"),
    ]
