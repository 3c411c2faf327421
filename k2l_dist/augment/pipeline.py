"""The training data path: WebDataset shards → DALI → pairs of augmented views.

One DALI graph serves training (two independently augmented views per sample) and
extraction/evaluation (``views=1``, augmentation off: the crop resampled to the view
size). Per sample it emits each view, the 2×3 matrix mapping crop pixels to that
view's pixels (pixel-centre convention, horizontal flip included), the flip flag and
the stable sample id. Points are not augmented here: pseudo-labels change every
round, so the training loop looks them up by id and maps them with
:func:`k2l_dist.utils.geometry.transform_points`.

Per view, in this order (each range an :class:`~k2l_dist.config.AugmentConfig` value,
each step left out of the graph when its range is zero):

* geometry, one resampling (bilinear; past the crop's edge the border pixel repeats, and
  ``models.regions`` masks it out of the losses): scale about the centre
  (also crop size → view size), rotation about the centre, translation (fraction of the
  view side), horizontal flip;
* photometric, on the warped uint8 image: hue/saturation (``fn.hsv``),
  brightness/contrast, Gaussian blur with probability ``blur_prob``;
* conversion to float32 CHW in [0, 1], RGB (no mean/std normalisation: the model's job);
* Gaussian noise, in torch on the batch (seeded per loader and rank), clipped to [0, 1].

Sharding: the reader splits the (checked) samples, in tar order, into ``world_size``
contiguous parts; each rank reads one per epoch and moves to the next part the next
epoch, so every epoch covers the dataset exactly once across ranks. With ``shuffle``
the tar order is permuted every epoch (one seed for all ranks) and each rank shuffles
its samples in a buffer of ``cfg.shuffle_buffer``. ``pad_last_batch`` pads every rank
to the same number of full batches by repeating a sample; the wrapper marks each
repeat (``valid=False``) or drops it, so no sample counts twice.

Devices: ``device="cuda[:i]"`` decodes with ``device="mixed"`` on GPU ``i`` (default the
local rank) and runs every image op there; ``device="cpu"`` builds the same graph with
``device_id=None`` (DALI's default device id fails on a machine without a driver). The
views and their matrices come on that device; ids, flips and ``valid`` on the host.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from k2l_dist.augment.validate import CheckedDataset, check_dataset
from k2l_dist.config import AugmentConfig
from k2l_dist.distributed.threads import threads_per_process
from k2l_dist.utils.backends import import_dali
from k2l_dist.utils.devices import resolve_device
from k2l_dist.utils.seeds import derive_seed

log = logging.getLogger("k2l_dist.augment")

READER_NAME = "shards"
Padded = Literal["mark", "drop"]


def _uniform(lo: float, hi: float, **kwargs: Any) -> Any:
    from nvidia.dali import fn

    return fn.random.uniform(range=[lo, hi], **kwargs)


def _view_graph(images: Any, cfg: AugmentConfig, crop_hw: tuple[int, int], size: int, augment: bool,
                flip: Any = None) -> tuple:
    """One view: (image float CHW [0,1], matrix crop→view 2×3 float32, flip int32 or None)."""
    from nvidia.dali import fn, types

    h, w = crop_hw
    centre_view = (size - 1) / 2.0
    # Geometry in pixel-centre coordinates: move the crop centre to the origin, scale,
    # rotate, move to the view centre plus a random shift, flip about the view centre.
    mat = fn.transforms.translation(offset=[-(w - 1) / 2.0, -(h - 1) / 2.0])
    if augment and cfg.scale_max > cfg.scale_min:
        s = _uniform(cfg.scale_min, cfg.scale_max)
        mat = fn.transforms.scale(mat, scale=fn.stack(s * (size / w), s * (size / h)))
    else:
        s0 = cfg.scale_min if augment else 1.0
        mat = fn.transforms.scale(mat, scale=[s0 * size / w, s0 * size / h])
    if augment and cfg.rotation > 0:
        mat = fn.transforms.rotation(mat, angle=_uniform(-cfg.rotation, cfg.rotation))
    if augment and cfg.translation > 0:
        shift = _uniform(-cfg.translation, cfg.translation, shape=[2])
        mat = fn.transforms.translation(mat, offset=shift * float(size) + centre_view)
    else:
        mat = fn.transforms.translation(mat, offset=[centre_view, centre_view])
    if augment and cfg.flip_prob > 0:
        if flip is None:
            flip = fn.random.coin_flip(probability=cfg.flip_prob, dtype=types.INT32)
        sx = 1.0 - 2.0 * fn.cast(flip, dtype=types.FLOAT)
        mat = fn.transforms.scale(mat, scale=fn.stack(sx, sx * 0.0 + 1.0), center=[centre_view, centre_view])

    # No fill_value: outside the crop DALI repeats the border pixel (as prepare's crops do),
    # so views carry no black corners for the detector to latch onto.
    # warp_affine puts (0, 0) at the first pixel's corner (pixel-edge convention) and,
    # with inverse_map=False, takes the source→destination map: conjugate by ±0.5.
    # (Its docs contradict themselves on inverse_map; tests/test_augment.py pins it down.)
    edge = fn.transforms.combine(
        fn.transforms.translation(offset=[-0.5, -0.5]), mat, fn.transforms.translation(offset=[0.5, 0.5])
    )
    out = fn.warp_affine(
        images,
        matrix=edge,
        size=[size, size],
        inverse_map=False,
        interp_type=types.INTERP_LINEAR,
    )

    if augment and (cfg.hue > 0 or cfg.saturation > 0):
        out = fn.hsv(
            out,
            hue=_uniform(-cfg.hue, cfg.hue) if cfg.hue > 0 else 0.0,
            saturation=_uniform(1 - cfg.saturation, 1 + cfg.saturation) if cfg.saturation > 0 else 1.0,
        )
    if augment and (cfg.brightness > 0 or cfg.contrast > 0):
        out = fn.brightness_contrast(
            out,
            brightness=_uniform(1 - cfg.brightness, 1 + cfg.brightness) if cfg.brightness > 0 else 1.0,
            contrast=_uniform(1 - cfg.contrast, 1 + cfg.contrast) if cfg.contrast > 0 else 1.0,
        )
    if augment and cfg.blur_prob > 0 and cfg.blur_sigma_max > 0:
        # Blur a random subset without DALI conditionals: unblurred samples get a
        # sigma so small that the 3-tap kernel is exactly [0, 1, 0].
        hit = fn.cast(fn.random.coin_flip(probability=cfg.blur_prob), dtype=types.FLOAT)
        sigma = hit * _uniform(0.1, cfg.blur_sigma_max) + (1.0 - hit) * 1e-3
        out = fn.gaussian_blur(out, sigma=sigma)
    out = fn.crop_mirror_normalize(
        out, dtype=types.FLOAT, output_layout="CHW", mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0]
    )
    return out, mat, flip


def _read(data: CheckedDataset, cfg: AugmentConfig, *, rank: int, world_size: int, seed: int,
          shuffle: bool) -> tuple[Any, Any]:
    """The reader of this rank's part of the shards: (JPEG bytes, sample id) nodes."""
    from nvidia.dali import fn, types

    # DALI warns about a shuffle seed given without shuffling: pass it only when used.
    shuffle_args = {"shuffle_after_epoch_seed": derive_seed(seed, 0, "tar-order")} if shuffle else {}
    return fn.readers.webdataset(
        paths=[str(p) for p in data.tar_paths],
        index_paths=[str(p) for p in data.index_paths],
        ext=["jpg", "id"],
        dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error",  # validate.py already dropped such samples
        shard_id=rank,
        num_shards=world_size,
        pad_last_batch=True,
        stick_to_shard=False,
        # Shuffling: the tar order changes every epoch (the same on every rank, so the
        # parts still partition the dataset), samples are shuffled in a buffer per rank.
        shuffle_after_epoch=shuffle,
        **shuffle_args,
        random_shuffle=shuffle,
        initial_fill=max(1, min(math.ceil(data.num_samples / world_size), cfg.shuffle_buffer)),
        seed=derive_seed(seed, rank, "shuffle"),
        name=READER_NAME,
    )


def _views(images: Any, cfg: AugmentConfig, crop_hw: tuple[int, int], size: int, augment: bool,
           views: int, partners: Any = None) -> tuple[list, list, list]:
    """``views`` augmented views of each image: (images, matrices, flips) node lists; with
    ``partners`` (a temporal pair's second frame, decoded) view 1 shows the partner."""
    from nvidia.dali import fn, types

    outs, mats, flips = [], [], []
    # One coin for all views of a sample when shared: a mirrored view must be
    # supervised with flipped labels, and the same-point positive between two views
    # is only consistent when both are mirrored or neither is.
    shared = None
    if augment and cfg.flip_prob > 0 and cfg.shared_flip:
        shared = fn.random.coin_flip(probability=cfg.flip_prob, dtype=types.INT32)
    for k in range(views):
        source = partners if (k == 1 and partners is not None) else images
        out, mat, flip = _view_graph(source, cfg, crop_hw, size, augment, shared)
        outs.append(out)
        mats.append(mat)
        if flip is not None:
            flips.append(flip)
    return outs, mats, flips


def build_pipeline(data: CheckedDataset, cfg: AugmentConfig, *, rank: int, world_size: int, seed: int,
                   device: torch.device, views: int = 2, shuffle: bool = True,
                   build: bool = True, pairs: Any = None) -> tuple[Any, dict[str, str]]:
    """The DALI pipeline and its outputs, in order: name → DALI device ("cpu"/"gpu").

    ``pairs`` (:class:`~k2l_dist.augment.temporal.TemporalPairs`, two views only): view 1
    shows the sample's partner frame, with ``partner_id``, ``points1`` and ``points1_ok``.

    ``build=False`` only defines the graph, which needs no GPU even for ``device="cuda"``
    (the tests check the GPU graph's devices that way).
    """
    import_dali()  # a missing DALI is one line saying what to install
    from nvidia.dali import fn, pipeline_def, types

    augment = bool(cfg.enabled)
    size = cfg.size or data.crop_size[1]
    batch_size = cfg.batch_size

    @pipeline_def(
        batch_size=batch_size,
        num_threads=cfg.num_threads or threads_per_process(),
        device_id=device.index if device.type == "cuda" else None,
        # per rank: else rank r's k-th sample would get rank 0's k-th transform
        seed=derive_seed(seed, rank, "augment"),
        prefetch_queue_depth=max(1, cfg.prefetch),
    )
    def graph() -> tuple:
        jpeg, sample_id = _read(data, cfg, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        decode = "mixed" if device.type == "cuda" else "cpu"
        images = fn.decoders.image(jpeg, device=decode, output_type=types.RGB)
        extra, partners = (), None
        if pairs is not None:  # on the loader's CPU stage, ahead of the step
            jpeg1, *extra = fn.python_function(jpeg, sample_id, function=pairs, num_outputs=4,
                                                   batch_processing=True)
            partners = fn.decoders.image(jpeg1, device=decode, output_type=types.RGB)
        outs, mats, flips = _views(images, cfg, data.crop_size, size, augment, views, partners)
        nodes = (*outs, *mats, *flips, sample_id, *extra)
        devices.extend(node.device for node in nodes)
        return nodes

    names = [f"view{k}" for k in range(views)] + [f"matrix{k}" for k in range(views)]
    if augment and cfg.flip_prob > 0:
        names += [f"flip{k}" for k in range(views)]
    names.append("id")
    if pairs is not None:
        if views != 2:
            raise ValueError(f"temporal pairs need two views, got {views}")
        names += ["partner_id", "points1", "points1_ok"]
    devices: list[str] = []
    pipe = graph()  # pipeline_def traces the graph here
    if len(devices) != len(names):
        raise RuntimeError(f"pipeline has {len(devices)} outputs, expected {names}")
    if build:
        pipe.build()
    return pipe, dict(zip(names, devices))


class AugmentLoader:
    """Iterates one epoch per ``for`` loop; batches are dicts of torch tensors, the views and
    matrices on ``device``, ``flip{k}``, ``id`` and ``valid`` on the host.

    Keys (B = ``cfg.batch_size``; S = the view side; k = 0 .. views-1):

    ``view{k}``   (B, 3, S, S) float32, RGB, in [0, 1] (no mean/std normalisation)
    ``matrix{k}`` (B, 2, 3) float32: crop pixel (x, y) → view pixel, pixel-centre
                  convention, flip included (use :func:`~k2l_dist.utils.geometry.transform_points`)
    ``flip{k}``   (B,) bool: the view is mirrored (use the flipped cluster labels)
    ``id``        (B,) int64: the stable sample id
    ``valid``     (B,) bool: False for padding repeats (``padded="mark"`` only)

    With temporal pairs (``pairs``), view 1 shows ``partner_id`` (B,) (the sample itself
    when not paired), ``points1`` (B, P, 2) float32 are the sample's label-table points
    tracked into it (crop pixels of the partner, NaN where lost) and ``points1_ok`` (B, P)
    bool the tracks kept; all on the host.

    Every rank yields ``len(loader)`` batches per epoch (the same on all ranks, as
    DistributedDataParallel needs), every batch full; padding repeats, in the last
    batch(es) of a rank's part, are marked ``valid=False`` and must be left out of the
    loss and of any statistics. With ``padded="drop"`` they are removed instead: the
    last batch may be smaller and ranks may yield different numbers of batches (fine
    for extraction, not for DDP training).

    An epoch left early is resumed by the next ``for`` loop; ``epoch`` counts the
    finished ones. ``num_samples`` is the dataset (after bad samples were skipped);
    ``last_epoch_samples`` is how many valid samples this rank yielded in its last epoch.
    """

    def __init__(
        self,
        data: CheckedDataset,
        cfg: AugmentConfig,
        *,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        views: int,
        shuffle: bool,
        padded: Padded,
        pairs: Any = None,
    ) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.data = data
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.views = views
        self.padded = padded
        self.batch_size = cfg.batch_size
        self.view_size = cfg.size or data.crop_size[1]
        self.epoch = 0
        self.last_epoch_samples = 0
        self._pipe, outputs = build_pipeline(
            data, cfg, rank=rank, world_size=world_size, seed=seed, device=device, views=views, shuffle=shuffle,
            pairs=pairs,
        )
        self._names = list(outputs)
        self._has_flip = "flip0" in outputs
        # FILL + the reader's pad_last_batch: full batches only, padded with repeats of
        # a real sample, and the same count on every rank; repeats are found by id below.
        self._it = DALIGenericIterator(
            [self._pipe],
            self._names,
            reader_name=READER_NAME,
            last_batch_policy=LastBatchPolicy.FILL,
            auto_reset=False,
        )
        self._batches = math.ceil(math.ceil(data.num_samples / world_size) / self.batch_size)
        if len(self._it) != self._batches:  # DALI's own count: a mismatch means semantics changed
            raise RuntimeError(f"DALI iterator reports {len(self._it)} batches, expected {self._batches}")
        self._seen: set[int] = set()
        self._valid_in_epoch = 0
        self._needs_reset = False
        # Gaussian noise is added here, in torch, not in the DALI graph: DALI's CPU noise
        # operator was half of the pipeline's time (BENCHMARKS.md, data loader).
        self._noise = None
        if cfg.enabled and cfg.noise_std > 0:
            self._noise = torch.Generator(device=device).manual_seed(derive_seed(seed, "noise", rank))

    @property
    def num_samples(self) -> int:
        return self.data.num_samples

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the crops in the shards: the coordinate frame of the matrices' input."""
        return self.data.crop_size

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples left out, by reason (see :mod:`k2l_dist.augment.validate`)."""
        return dict(self.data.skipped)

    def __len__(self) -> int:
        return self._batches

    def _add_noise(self, views: torch.Tensor) -> torch.Tensor:
        """Per image a standard deviation drawn from [0, noise_std], then clipped to [0, 1]."""
        if self._noise is None:
            return views
        std = torch.rand(views.shape[0], 1, 1, 1, generator=self._noise, device=views.device) * self.cfg.noise_std
        noise = torch.randn(views.shape, generator=self._noise, device=views.device, dtype=views.dtype)
        return (views + std * noise).clamp_(0.0, 1.0)

    def _convert(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        ids = out["id"].reshape(-1).to(torch.int64).cpu()
        valid_list = []
        for i in ids.tolist():
            valid_list.append(i not in self._seen)
            self._seen.add(i)
        valid = torch.tensor(valid_list, dtype=torch.bool)
        self._valid_in_epoch += int(valid.sum())
        dev = self.device
        batch: dict[str, torch.Tensor] = {}
        # ids, flips and the padding flags stay on the host: the step looks labels up by id
        # and picks flipped labels there, so reading them never waits for the device
        for k in range(self.views):
            batch[f"view{k}"] = self._add_noise(out[f"view{k}"])
            batch[f"matrix{k}"] = out[f"matrix{k}"].to(dev, torch.float32)
            if self._has_flip:
                batch[f"flip{k}"] = out[f"flip{k}"].reshape(-1).to("cpu", torch.bool)
            else:
                batch[f"flip{k}"] = torch.zeros(ids.shape[0], dtype=torch.bool)
        batch["id"] = ids
        for key in ("partner_id", "points1", "points1_ok"):  # temporal pairs: read by the step on the host
            if key in out:
                batch[key] = out[key].cpu()
        if "partner_id" in batch:
            batch["partner_id"] = batch["partner_id"].reshape(-1).to(torch.int64)
            batch["points1_ok"] = batch["points1_ok"].to(torch.bool)
        if self.padded == "drop":
            if not bool(valid.any()):
                return None
            if not bool(valid.all()):
                keep = valid.nonzero().squeeze(1)
                batch = {k: v[keep.to(v.device)] for k, v in batch.items()}
        else:
            batch["valid"] = valid
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._needs_reset:
            self._it.reset()
            self._needs_reset = False
        while True:
            try:
                out = next(self._it)[0]
            except StopIteration:
                break
            batch = self._convert(out)
            if batch is not None:
                yield batch
        self.last_epoch_samples = self._valid_in_epoch
        self._seen = set()
        self._valid_in_epoch = 0
        self._needs_reset = True
        self.epoch += 1


def build_loader(
    shard_dir: str | Path,
    cfg: AugmentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    views: int = 2,
    shuffle: bool = True,
    strict: bool | None = None,
    padded: Padded = "mark",
    cache_dir: str | Path | None = None,
    ids: np.ndarray | None = None,
    pairs: Any = None,
) -> AugmentLoader:
    """The one data path of k2l-dist: a prepared shard folder → batches of augmented views.

    ``strict`` (default ``cfg.strict``): a bad sample raises :class:`ShardError` instead of
    being skipped with a warning naming its shard. A missing folder or shard always
    raises a one-line :class:`ShardError`. ``cache_dir`` keeps shard-check results and
    cleaned indexes (default: a per-user folder under the system temp dir).
    ``ids`` restricts the loader to those sample ids (a train or test split). ``pairs``
    builds temporal pairs: a callable ``(data) → TemporalPairs`` given the checked dataset.
    See :class:`AugmentLoader` for the batches.
    """
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if cfg.batch_size < 1:
        raise ValueError(f"augment.batch_size must be >= 1, got {cfg.batch_size}")
    if padded not in ("mark", "drop"):
        raise ValueError(f"padded must be 'mark' or 'drop', got {padded!r}")
    if cfg.enabled and not 0 < cfg.scale_min <= cfg.scale_max:
        raise ValueError(f"augment.scale_min/max must satisfy 0 < min <= max, got {cfg.scale_min}, {cfg.scale_max}")
    dev = resolve_device(device)
    data = check_dataset(
        shard_dir,
        strict=cfg.strict if strict is None else strict,
        cache_dir=cache_dir,
        threads=cfg.num_threads or threads_per_process(),
        ids=ids,
    )
    if data.num_samples < world_size:
        raise ValueError(f"{shard_dir}: {data.num_samples} usable samples for {world_size} ranks")
    if data.skipped:
        log.warning("%s: %d bad sample(s) skipped (%s); %d remain", shard_dir, data.num_skipped,
                    ", ".join(f"{n} {r}" for r, n in sorted(data.skipped.items())), data.num_samples)
    return AugmentLoader(data, cfg, rank=rank, world_size=world_size, seed=seed, device=dev, views=views,
                         shuffle=shuffle, padded=padded, pairs=pairs(data) if pairs is not None else None)
