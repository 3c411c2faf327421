"""Throughput of the DALI data path on CPU vs a plain WebDataset + OpenCV loop.

Both loaders do the same work per sample: decode the JPEG crop, make two views, each
with its own random affine (rotation, scale, translation) + horizontal flip in one
bilinear warp, hue/saturation, brightness/contrast, Gaussian blur (with probability
``blur_prob``) and Gaussian noise, convert to float32 CHW in [0, 1], and batch. The
OpenCV loop lives only here, as a yardstick: the project has one augmentation path,
:mod:`k2l_dist.augment.pipeline`.

Two settings, each timed as full epochs after a warm-up epoch, median of ``--repeats``:

* 1 thread: DALI ``num_threads=1`` vs the OpenCV loop in the main process;
* ``--threads`` N: DALI ``num_threads=N`` vs a torch DataLoader with N worker processes.

Without ``--shards`` it writes ~1000 synthetic pictures of random shapes (128 px) to a
temporary folder. Results are printed and written as this script's own section of
``BENCHMARKS.md`` (the rest of that file is left as it is).

    python bench/bench_loader.py [--shards DIR] [--images 1000] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch

from k2l_dist.augment import build_loader
from k2l_dist.config import AugmentConfig
from k2l_dist.data.shards import SHARD_PATTERN, Sample, shard_paths, write_index, write_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

# --------------------------------------------------------------------------- synthetic shards


def synthetic_picture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A BGR picture: a gradient background and a few random filled shapes."""
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = (c0 + (c1 - c0) * ramp[None, :, None] * np.ones((size, 1, 1), np.float32)).astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        colour = rng.integers(0, 256, 3).tolist()
        kind = rng.integers(0, 4)
        if kind == 0:
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.circle(img, centre, int(rng.integers(5, size // 3)), colour, -1)
        elif kind == 1:
            p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
            cv2.rectangle(img, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, -1)
        elif kind == 2:
            cv2.fillPoly(img, [rng.integers(0, size, (3, 2)).astype(np.int32)], colour)
        else:
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            axes = tuple(int(v) for v in rng.integers(4, size // 3, 2))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return img


def write_synthetic(out: Path, images: int, size: int, per_shard: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shards = []
    for k in range(math.ceil(images / per_shard)):
        ids = range(k * per_shard, min(images, (k + 1) * per_shard))
        samples = []
        for i in ids:
            ok, jpeg = cv2.imencode(".jpg", synthetic_picture(rng, size), [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            samples.append(
                Sample(
                    id=i,
                    path=f"synthetic/{i:06d}.png",
                    image_jpeg=jpeg.tobytes(),
                    box=(0.0, 0.0, float(size)),
                    orig_size=(size, size),
                    keypoints=np.zeros((0, 2), np.float32),
                    descriptors=np.zeros((0, 32), np.uint8),
                )
            )
        name = SHARD_PATTERN.format(k)
        write_shard(out / name, samples)
        shards.append({"name": name, "count": len(samples)})
    write_index(out, {"count": images, "shards": shards, "size": size}, {"id": np.arange(images, dtype=np.int64)})
    return out


# --------------------------------------------------------------------------- the OpenCV yardstick


def _affine(rng: np.random.Generator, cfg: AugmentConfig, crop: int, size: int) -> np.ndarray:
    """Crop → view matrix, pixel-centre convention, same ranges and order as the DALI graph."""
    s = rng.uniform(cfg.scale_min, cfg.scale_max) * size / crop
    a = math.radians(rng.uniform(-cfg.rotation, cfg.rotation))
    t = rng.uniform(-cfg.translation, cfg.translation, 2) * size + (size - 1) / 2
    lin = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m = np.concatenate([lin, (t - lin @ np.full(2, (crop - 1) / 2))[:, None]], 1)
    if rng.random() < cfg.flip_prob:
        m = np.array([[-1.0, 0, size - 1], [0, 1, 0]]) @ np.vstack([m, [0, 0, 1]])
    return m


def opencv_view(rgb: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, size: int) -> np.ndarray:
    m = _affine(rng, cfg, rgb.shape[1], size)
    # OpenCV's warpAffine also samples at pixel centres: the matrix is used as is.
    out = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue) / 2) % 180  # OpenCV hue is degrees / 2
    hsv[..., 1] *= rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    out = b * (128 + c * (out - 128))
    if rng.random() < cfg.blur_prob:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.1, cfg.blur_sigma_max))
    out += rng.normal(0, rng.uniform(0, cfg.noise_std * 255), out.shape).astype(np.float32)
    return np.clip(out, 0, 255).transpose(2, 0, 1) / 255.0


def opencv_sample(cfg: AugmentConfig, size: int, seed: int) -> Callable[[dict], dict]:
    rng = np.random.default_rng(seed)

    def process(sample: dict) -> dict:
        # Members stay raw bytes (no webdataset auto-decoding, which would unpickle .pyd).
        bgr = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return {
            "view0": opencv_view(rgb, rng, cfg, size).astype(np.float32),
            "view1": opencv_view(rgb, rng, cfg, size).astype(np.float32),
            "id": int(np.frombuffer(sample["id"], "<i8")[0]),
        }

    return process


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "view0": torch.from_numpy(np.stack([s["view0"] for s in samples])),
        "view1": torch.from_numpy(np.stack([s["view1"] for s in samples])),
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.int64),
    }


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)


def opencv_loader(urls: list[str], cfg: AugmentConfig, size: int, workers: int, seed: int) -> Iterable:
    import webdataset as wds

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = (
        wds.WebDataset(
            urls,
            shardshuffle=False,
            # webdataset refuses several nodes without an explicit splitter.
            nodesplitter=wds.split_by_node if world > 1 else wds.single_node_only,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        .shuffle(min(1000, cfg.shuffle_buffer), rng=__import__("random").Random(seed))
        .map(opencv_sample(cfg, size, seed))
        .batched(cfg.batch_size, collation_fn=collate, partial=True)
    )
    if workers == 0:
        return dataset
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, worker_init_fn=_worker_init, persistent_workers=True
    )


# --------------------------------------------------------------------------- timing


def time_epochs(make_iter: Callable[[], Iterable], repeats: int) -> tuple[list[float], int]:
    """Seconds per epoch (after one warm-up epoch) and the samples in an epoch."""
    count = 0
    for batch in make_iter():  # warm-up: first JPEG decodes, worker start, allocations
        valid = batch.get("valid")
        count += int(valid.sum()) if valid is not None else len(batch["id"])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = 0
        for batch in make_iter():
            n += len(batch["id"])
        times.append(time.perf_counter() - start)
    return times, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="a prepared shard folder (default: synthetic, in a temp dir)")
    parser.add_argument("--images", type=int, default=1000, help="synthetic images to write")
    parser.add_argument("--size", type=int, default=128, help="synthetic crop side, pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per loader (median reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--breakdown", action="store_true", help="also time DALI (1 thread) with each op left out")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory(prefix="k2l-bench-") as tmp:
        if args.shards is None:
            shard_dir = write_synthetic(Path(tmp) / "shards", args.images, args.size, per_shard=125)
            source = f"{args.images} synthetic random-shape pictures, {args.size} px, JPEG q95, 125 per shard"
        else:
            shard_dir = args.shards
            source = f"prepared folder {args.shards}"
        urls = [str(p) for p in shard_paths(shard_dir)]

        rows = []
        for threads in sorted({1, args.threads}):
            cfg = AugmentConfig(batch_size=args.batch_size, num_threads=threads)
            started = time.perf_counter()
            dali = build_loader(
                shard_dir, cfg, rank=rank, world_size=world, seed=0, device="cpu", cache_dir=Path(tmp) / "cache"
            )
            startup = time.perf_counter() - started
            size = dali.view_size
            dali_times, dali_n = time_epochs(lambda: dali, args.repeats)

            cv2.setNumThreads(1)  # one core per loader thread/worker, like DALI's pool
            workers = 0 if threads == 1 else threads
            ocv = opencv_loader(urls, cfg, size, workers, seed=0)
            ocv_times, ocv_n = time_epochs(lambda: ocv, args.repeats)
            dali_rate = dali_n / statistics.median(dali_times)
            ocv_rate = ocv_n / statistics.median(ocv_times)
            rows.append((threads, dali_rate, dali_times, dali_n, ocv_rate, ocv_times, ocv_n, startup))
            print(
                f"threads={threads}: DALI CPU {dali_rate:8.1f} img/s ({dali_n} per epoch, startup {startup:.2f} s) | "
                f"WebDataset+OpenCV ({'in-process' if workers == 0 else f'{workers} workers'}) "
                f"{ocv_rate:8.1f} img/s ({ocv_n} per epoch) | DALI/OpenCV = {dali_rate / ocv_rate:.2f}",
                flush=True,
            )

        breakdown = []
        if args.breakdown:
            photo_off = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, blur_prob=0.0, noise_std=0.0)
            variants = [
                ("all ops", {}),
                ("no noise", dict(noise_std=0.0)),
                ("no blur", dict(blur_prob=0.0)),
                ("no hue/saturation", dict(hue=0.0, saturation=0.0)),
                ("no brightness/contrast", dict(brightness=0.0, contrast=0.0)),
                ("geometry only", photo_off),
                ("augmentation off (identity warps)", dict(enabled=False)),
            ]
            for name, change in variants:
                cfg = AugmentConfig(batch_size=args.batch_size, num_threads=1, **change)
                loader = build_loader(
                    shard_dir, cfg, rank=rank, world_size=world, seed=0, device="cpu", cache_dir=Path(tmp) / "cache"
                )
                times, n = time_epochs(lambda: loader, args.repeats)
                breakdown.append((name, n / statistics.median(times)))
                print(f"DALI 1 thread, {name}: {breakdown[-1][1]:.1f} img/s", flush=True)
                del loader

    import nvidia.dali

    lines = [
        "## Data loader: DALI (CPU) vs WebDataset + OpenCV",
        "",
        f"`python bench/bench_loader.py{'' if args.shards is None else f' --shards {args.shards}'}"
        f" --batch-size {args.batch_size} --threads {args.threads} --repeats {args.repeats}`"
        f" — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- data: {source}",
        f"- work per sample (both loaders): JPEG decode, 2 views each with its own random affine"
        f" (±{AugmentConfig.rotation:g}°, scale {AugmentConfig.scale_min:g}–{AugmentConfig.scale_max:g},"
        f" shift ±{AugmentConfig.translation:g}) + flip (p={AugmentConfig.flip_prob:g}) in one bilinear warp,"
        f" hue/saturation, brightness/contrast, blur (p={AugmentConfig.blur_prob:g}), noise,"
        f" float32 CHW [0,1], batches of {args.batch_size}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores visible (shared), no GPU;"
        f" Python {platform.python_version()}, torch {torch.__version__}, DALI {nvidia.dali.__version__},"
        f" OpenCV {cv2.__version__}; 1-min load average {load_before:.1f} before,"
        f" {os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f} after the run",
        f"- timing: full epochs after one warm-up epoch, median of {args.repeats} (min–max in brackets);"
        " DALI startup (shard check + pipeline build) not included",
        "",
        "| threads | DALI CPU img/s | WebDataset + OpenCV img/s | DALI / OpenCV |",
        "|---|---|---|---|",
    ]
    for threads, dr, dt, dn, orate, ot, on, _ in rows:
        lines.append(
            f"| {threads} | {dr:.0f} ({dn / max(dt):.0f}–{dn / min(dt):.0f}) |"
            f" {orate:.0f} ({on / max(ot):.0f}–{on / min(ot):.0f})"
            f" {'in-process' if threads == 1 else f'{threads} workers'} | {dr / orate:.2f} |"
        )
    lines += [
        "",
        "img/s counts samples (each gives two views). On CPU, DALI's per-image cost can exceed OpenCV's;"
        " its point is the identical graph on GPU (mixed decoding, GPU warps) in training.",
    ]
    if breakdown:
        lines += [
            "",
            f"Where DALI's CPU time goes (1 thread, median of {args.repeats}; ms per sample = 2 views):",
            "",
            "| DALI CPU, 1 thread | img/s | ms / sample |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {rate:.0f} | {1000 / rate:.1f} |" for name, rate in breakdown]
    body = "\n".join(lines)
    print()
    print(body)
    if not args.no_write:
        write_section(args.out, "bench_loader", body)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
