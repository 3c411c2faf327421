"""Loop efficiency: the real training loop against what its model alone costs.

For a config's model and its prepared shards (prepared here if missing), per phase
(Stage-1 warm-up, a Stage-1 round, Stage 2), on one process:

* **limit**: the network's forward + backward + RMSprop step on one real batch held in
  memory, with a loss that only sums the outputs: the most this model can do here;
* **step in memory**: the real loss (``stage1_losses`` / ``stage2_losses``) on that batch;
* **loader alone**: batches drawn from the phase's DALI loader with no compute;
* **real loop**: ``training.loop.train_iterations`` over the loader with the real loss, as
  ``k2l train`` runs it.

Efficiency = limit / real loop (1.0: the loop adds nothing). Each is a median over
``--repeats`` × ``--steps`` steps; the phases alternate within a repeat. The warm-up uses
the initial keypoints as ``k2l train`` does; the round uses a label table with
``cluster.K`` points per image (labels drawn at random), about what a round keeps.

    python bench/bench_loop.py --config configs/quickstart.yaml
    python bench/bench_loop.py --config configs/mtfl_cpu.yaml --section bench_loop_mtfl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from report import machine, write_section  # noqa: E402

# The paper's schedule: a round every 5,000 iterations of 16 pairs on CelebA's ~200k images.
PAIRS_PER_IMAGE_PER_ROUND = 5000 * 16 / 200_000
PAPER_ROUNDS = 34  # T (Sec. 4.2)


def round_table(table, K: int, seed: int = 0):
    """The warm-up table cut to K points per image with labels in [0, K): a round's shape."""
    import numpy as np

    from k2l_dist.training.labels import LabelTable

    rng = np.random.default_rng(seed)
    counts = np.minimum(table.counts, K)
    rows = np.concatenate([np.arange(s, s + c) for s, c in zip(table.offsets[:-1], counts)]) if len(counts) else []
    ids = np.repeat(table.ids, counts)
    labels = rng.integers(0, K, len(ids))
    return LabelTable.from_points(ids, table.points[rows], labels, labels.copy())


def measure(args) -> dict:
    import numpy as np
    import torch

    from k2l_dist import distributed
    from k2l_dist.config import load_config
    from k2l_dist.data.shards import load_manifest, load_samples_meta
    from k2l_dist.models import KeypointNet, LandmarkNet, count_parameters
    from k2l_dist.models.regions import CropRegions
    from k2l_dist.prepare import is_prepared, prepare
    from k2l_dist.training.loop import forever, train_iterations
    from k2l_dist.training.optim import rmsprop
    from k2l_dist.training.phases import initial_table, make_loader
    from k2l_dist.training.steps import stage1_losses, stage2_losses
    from k2l_dist.utils.metrics import MetricsLogger

    cfg = load_config(ROOT / args.config, args.overrides)
    info = distributed.enable(cfg.dist, "cpu")
    shard_dir = Path(args.shards or Path(cfg.run_dir) / "shards")
    if not is_prepared(shard_dir):
        prepare(cfg, shard_dir)
    meta, manifest = load_samples_meta(shard_dir), load_manifest(shard_dir)
    ids = np.asarray(meta["ids"], np.int64)
    regions = CropRegions.from_meta(meta, int(manifest["size"])) if cfg.loss.mask_padding else None
    warm = initial_table(meta, ids)
    tables = {"warmup": warm, "round": round_table(warm, cfg.cluster.K)}
    table2 = round_table(warm, cfg.cluster.K, seed=1)
    torch.manual_seed(0)
    phi = KeypointNet(cfg.model)
    psi = LandmarkNet.from_keypoint_net(phi, cfg.cluster.K)
    opt = rmsprop(phi.parameters(), lr=cfg.stage1.lr)
    opt2 = rmsprop(psi.parameters(), lr=cfg.stage2.lr)
    gen = torch.Generator().manual_seed(0)
    loaders = {"stage1": make_loader(cfg, shard_dir, ids, info, train=True, seed=1),
               "stage2": make_loader(cfg, shard_dir, ids, info, train=True, seed=2, views=1)}
    streams = {k: forever(v) for k, v in loaders.items()}
    held = {k: next(s) for k, s in streams.items()}  # one real batch of each kind, kept in memory
    log = MetricsLogger(tempfile.mkdtemp(prefix="k2l-bench-loop-"), enabled=False)

    def loss1(phase):
        return lambda b: stage1_losses(phi, b, tables[phase], max_points=cfg.stage1.max_points, loss_cfg=cfg.loss,
                                       generator=gen, regions=regions)

    def loss2(b):
        return stage2_losses(psi, b, table2, num_landmarks=cfg.cluster.K, sigma=cfg.loss.heatmap_sigma,
                             regions=regions)

    def limit(net, optim, batch, views):
        out = net(torch.cat([batch[f"view{v}"] for v in range(views)]))
        loss = sum(o.mean() for o in (out if isinstance(out, tuple) else (out,)))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    def in_memory(net, optim, fn, batch):
        losses = fn(batch)
        optim.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optim.step()

    phases = {
        "Stage-1 warm-up": dict(net=phi, optim=opt, fn=loss1("warmup"), kind="stage1", views=2, key="warmup"),
        "Stage-1 round": dict(net=phi, optim=opt, fn=loss1("round"), kind="stage1", views=2, key="round"),
        "Stage 2": dict(net=psi, optim=opt2, fn=loss2, kind="stage2", views=1, key="stage2"),
    }
    phases = {k: v for k, v in phases.items() if v["key"] in args.phases.split(",")}
    parts = ("limit", "step in memory", "loader alone", "real loop")
    times = {p: {k: [] for k in parts} for p in phases}

    def timed_steps(fn, steps: int) -> float:
        t0 = time.perf_counter()
        fn(steps)
        return (time.perf_counter() - t0) / steps

    for repeat in range(args.repeats + 1):  # the first repeat warms up (allocator, DALI prefetch) and is dropped
        for name, ph in phases.items():
            batch = held[ph["kind"]]
            got = {
                "limit": timed_steps(lambda n: [limit(ph["net"], ph["optim"], batch, ph["views"]) for _ in range(n)],
                                     args.steps),
                "step in memory": timed_steps(lambda n: [in_memory(ph["net"], ph["optim"], ph["fn"], batch)
                                                         for _ in range(n)], args.steps),
                "loader alone": timed_steps(lambda n: [next(streams[ph["kind"]]) for _ in range(n)], args.steps),
                "real loop": timed_steps(lambda n: train_iterations(
                    ph["net"], ph["optim"], loaders[ph["kind"]], ph["fn"], n, info=info, step=0, log=log,
                    prefix="bench/", log_every=10**9, show_progress=False), args.steps),
            }
            if repeat:
                for k, v in got.items():
                    times[name][k].append(v)
    result = {"times": times, "params_phi": count_parameters(phi), "threads": info.threads, "cfg": cfg,
              "images": len(ids)}
    if args.skip_pseudo_labelling or "round" not in args.phases:
        distributed.shutdown()
        return result
    # One round's pseudo-labelling over the whole dataset, as `k2l train` does it.
    from k2l_dist.clustering.service import InlineService
    from k2l_dist.models.extract import extract, extraction_cap

    s1 = cfg.stage1
    ext_loader = make_loader(cfg, shard_dir, ids, info, train=False, seed=0)
    t0 = time.perf_counter()
    # threshold 0: this untrained Φ's peaks are weak; every image then fills its cap, the
    # most work a round can be handed
    ext = extract(phi, ext_loader, max_points=extraction_cap(cfg), threshold=0.0,
                  nms_radius=s1.nms_radius, flip=s1.flip, subpixel=s1.subpixel, total=len(ext_loader),
                  show_progress=False, regions=regions)
    extract_s = time.perf_counter() - t0
    service = InlineService(cfg.cluster, 1)
    full = service.recover("round", ext.as_dict(), "bench")
    cluster_s = service.timings["cluster_seconds"]
    partial = None
    if s1.extract_fraction < 1:
        partial = _partial_round(cfg, shard_dir, ids, info, phi, regions, service, full)
    images = next(iter(ext_loader))["view0"]
    phi.eval()
    forward = []
    with torch.inference_mode():
        for _ in range(args.steps):
            t0 = time.perf_counter()
            phi(images)
            if s1.flip:
                phi(torch.flip(images, dims=[-1]))
            forward.append(time.perf_counter() - t0)
    phi.train()
    distributed.shutdown()
    result["round"] = {"extract_s": extract_s, "cluster_s": cluster_s, "extracted": ext.num_images,
                       "forward_limit_img_s": len(images) / statistics.median(forward), "partial": partial}
    return result


def _partial_round(cfg, shard_dir, ids, info, phi, regions, service, full) -> dict:
    """A partial round (``stage1.extract_fraction``) as `k2l train` runs it: extraction and
    clustering of a seeded part, then the other images' labels carried over from ``full``."""
    from k2l_dist.clustering.carry import carry_labels
    from k2l_dist.models.extract import extract, extraction_cap
    from k2l_dist.training.labels import LabelTable
    from k2l_dist.training.phases import carry_radius, make_loader, round_extract_ids

    s1 = cfg.stage1
    part_ids = round_extract_ids(ids, s1.extract_fraction, 2, 3, cfg.seed)
    loader = make_loader(cfg, shard_dir, part_ids, info, train=False, seed=0)
    t0 = time.perf_counter()
    ext = extract(phi, loader, max_points=extraction_cap(cfg), threshold=0.0, nms_radius=s1.nms_radius,
                  flip=s1.flip, subpixel=s1.subpixel, total=len(loader), show_progress=False, regions=regions)
    extract_s = time.perf_counter() - t0
    fresh = service.recover("round", ext.as_dict(), "bench-partial")
    cluster_s = service.timings["cluster_seconds"]
    t0 = time.perf_counter()
    carry_labels(LabelTable.from_round(full), fresh, carry_radius(cfg, cfg.data.size))
    return {"extract_s": extract_s, "cluster_s": cluster_s, "carry_s": time.perf_counter() - t0,
            "extracted": ext.num_images}


def _round_lines(cfg, res: dict) -> list[str]:
    rnd = res["round"]
    n = rnd["extracted"]
    step_s = statistics.median(res["times"]["Stage-1 round"]["real loop"])
    iters = PAIRS_PER_IMAGE_PER_ROUND * n / cfg.augment.batch_size
    pseudo_s = rnd["extract_s"] + rnd["cluster_s"]
    train_s = iters * step_s
    floor_s = n / rnd["forward_limit_img_s"]
    round_lines = [
        "",
        f"One round's pseudo-labelling over all {n:,} images (extraction with the mirror pass, then inline "
        f"two-way clustering) against the training it feeds at the paper's ratio (5,000 iterations × 16 pairs "
        f"per round on CelebA's ~200k images: {PAIRS_PER_IMAGE_PER_ROUND} pairs per image per round, here "
        f"{iters:.0f} iterations of the real loop). Target (at the MTFL config): ≤ 25% of Stage-1 time.",
        "",
        "| extraction s (images/s) | forward-only limit images/s | clustering s | training per round s | "
        "round overhead | overhead if extraction ran at its limit |",
        "|---|---|---|---|---|---|",
        f"| {rnd['extract_s']:.1f} ({n / rnd['extract_s']:.0f}) | {rnd['forward_limit_img_s']:.0f} | "
        f"{rnd['cluster_s']:.1f} | {train_s:.0f} | {100 * pseudo_s / (pseudo_s + train_s):.0f}% | "
        f"{100 * (floor_s + rnd['cluster_s']) / (floor_s + rnd['cluster_s'] + train_s):.0f}% |",
    ]
    part = rnd.get("partial")
    if part:
        part_s = part["extract_s"] + part["cluster_s"] + part["carry_s"]
        share = part["extracted"] / n
        paper = (2 * pseudo_s + (PAPER_ROUNDS - 2) * part_s) / PAPER_ROUNDS  # first and last rounds: every image
        round_lines += [
            "",
            f"A partial round (`stage1.extract_fraction={cfg.stage1.extract_fraction}`): {part['extracted']:,} "
            f"images ({share:.0%}) extracted and clustered, the others' labels carried over; the first and the "
            f"last round extract every image, so over the paper's {PAPER_ROUNDS} rounds a round costs "
            f"{paper:.1f} s on average.",
            "",
            "| extraction s | clustering s | carrying labels s | partial round overhead | "
            f"overhead over {PAPER_ROUNDS} rounds |",
            "|---|---|---|---|---|",
            f"| {part['extract_s']:.1f} | {part['cluster_s']:.1f} | {part['carry_s']:.2f} | "
            f"{100 * part_s / (part_s + train_s):.0f}% | {100 * paper / (paper + train_s):.0f}% |",
        ]
    return round_lines


def report(args, res: dict) -> str:
    cfg = res["cfg"]
    rows = []
    for name, t in res["times"].items():
        med = {k: 1000 * statistics.median(v) for k, v in t.items()}
        views = 1 if name == "Stage 2" else 2
        img_s = views * cfg.augment.batch_size / (med["real loop"] / 1000)
        rows.append(f"| {name} | {med['limit']:.0f} | {med['step in memory']:.0f} | {med['loader alone']:.0f} | "
                    f"{med['real loop']:.0f} | {img_s:.0f} | {med['limit'] / med['real loop']:.2f} |")
    round_lines = [] if "round" not in res else _round_lines(cfg, res)
    cmd = " ".join(["python bench/bench_loop.py", "--config", args.config,
                    *([f"--shards {args.shards}"] if args.shards else []), "--steps", str(args.steps),
                    "--repeats", str(args.repeats),
                    *([f"--phases {args.phases}"] if args.phases != "warmup,round,stage2" else []),
                    *(["--skip-pseudo-labelling"] if args.skip_pseudo_labelling else []), *args.overrides])
    return "\n".join([
        f"## Loop efficiency: `{args.config}`",
        "",
        f"`{cmd}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- model: Φ {res['params_phi'] / 1e6:.2f} M parameters (width {cfg.model.width}, depth {cfg.model.depth}), "
        f"{cfg.data.size} px, {cfg.augment.batch_size} images per step (two views each in Stage 1), "
        f"{res['threads']} torch threads; shards of {res['images']:,} images",
        f"- medians of {args.repeats} × {args.steps} steps per column, ms per step; efficiency = limit / real loop "
        "(target ≥ 0.85)",
        "",
        "| phase | limit | step in memory | loader alone | real loop | real loop images/s | efficiency |",
        "|---|---|---|---|---|---|---|",
        *rows,
        *round_lines,
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--shards", help="prepared shard folder (default: <run_dir>/shards, prepared if missing)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--section", default="", help="BENCHMARKS.md section (default: bench_loop_<config name>)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--phases", default="warmup,round,stage2", help="which of warmup,round,stage2 to time")
    p.add_argument("--skip-pseudo-labelling", action="store_true", help="leave out the round-overhead measurement")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()
    body = report(args, measure(args))
    print(body)
    if not args.no_write:
        write_section(args.out, args.section or f"bench_loop_{Path(args.config).stem}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
