"""Training and extraction steps of a config's model on one device: fp32 vs bf16, and the losses' share.

For each precision, on fixed in-memory pairs (no data loading: compute alone):

* **limit**: Φ's forward + backward on a loss that only sums its outputs, plus the
  RMSprop step: what this model costs on this device;
* **Stage-1 step**: the real step (``train.steps.stage1_losses``: detector MSE +
  contrastive loss with same-image negatives, backward, RMSprop); its excess over the
  limit is the losses' share;
* **Stage-2 step**: Ψ (K heatmaps) on one view, ``stage2_losses``;
* **extraction**: ``models.extract.extract`` (peaks, descriptors and the mirror pass) in
  images per second.

Medians over ``--repeats`` × ``--steps``; precisions alternate within each repeat. Under
``torchrun --nproc-per-node=1`` the run goes through ``distributed.enable`` (NCCL on a GPU)
and DDP, and also checks the collectives and replica checksums on that backend.

    python bench/bench_step.py --config configs/celeba.yaml --device cuda --size 256 --pairs 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from fixtures import fixed_pairs, stage1_update  # noqa: E402
from report import machine, write_section  # noqa: E402


def _timer(device):
    import torch

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    return timed


def measure(args) -> dict:
    import dataclasses

    import numpy as np
    import torch

    from k2l_dist import distributed
    from k2l_dist.config import load_config
    from k2l_dist.distributed.collectives import broadcast_arrays, check_replicas
    from k2l_dist.models import KeypointNet, LandmarkNet, count_parameters
    from k2l_dist.models.extract import extract
    from k2l_dist.training.optim import rmsprop
    from k2l_dist.training.steps import autocast, stage2_losses
    from k2l_dist.utils.devices import place

    cfg = load_config(ROOT / args.config, args.overrides)
    info = distributed.enable(cfg.dist, args.device)
    dev = info.device
    batch, table = fixed_pairs(args.pairs, args.size, cfg.cluster.M, dev, info.rank)
    table2 = dataclasses.replace(table, labels=table.labels % cfg.cluster.K,
                                 flipped_labels=table.flipped_labels % cfg.cluster.K)
    gen = torch.Generator(device="cpu").manual_seed(info.rank)  # as the training loop draws its negatives
    timed = _timer(dev)
    images = torch.cat([batch["view0"], batch["view1"]])
    eye = batch["matrix0"].repeat(2, 1, 1)
    ids = torch.arange(len(images), device=dev)

    def steps(memory_format: str, width: int) -> dict:
        """The four timed kinds on networks of the same initial weights in ``memory_format``."""
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(cfg.model, width=width)
        phi = place(KeypointNet(model_cfg), dev, memory_format)
        psi = place(LandmarkNet.from_keypoint_net(phi, cfg.cluster.K), dev, memory_format)
        phi_ddp, psi_ddp = distributed.wrap_ddp(phi, info), distributed.wrap_ddp(psi, info)
        phi_run = phi
        if args.compile:  # the training loop's compile=inductor
            phi_ddp, psi_ddp, phi_run = torch.compile(phi_ddp), torch.compile(psi_ddp), torch.compile(phi)
        opt = rmsprop(phi.parameters(), lr=cfg.stage1.lr)
        opt2 = rmsprop(psi.parameters(), lr=cfg.stage2.lr)

        limit = limit_step(phi_ddp, opt, images)
        stage1 = stage1_update(phi_ddp, opt, batch, table, cfg, gen)

        def stage2(precision: str) -> None:
            with autocast(dev, precision):
                losses = stage2_losses(psi_ddp, batch, table2, num_landmarks=cfg.cluster.K,
                                       sigma=cfg.loss.heatmap_sigma)
            opt2.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt2.step()

        def extraction(precision: str) -> None:
            with autocast(dev, precision):
                extract(phi_run, [{"view0": images, "matrix0": eye, "id": ids}],
                        max_points=cfg.stage1.extract_points, threshold=0.0, flip=True, show_progress=False)

        return {"limit": limit, "stage1": stage1, "stage2": stage2, "extract": extraction, "phi": phi}

    networks = {_name(p, w, f, args): (p, steps(f, w)) for p in args.precision for w in args.widths
                for f in args.formats}
    if args.official:  # the paper's code: its FAN's forward + backward + RMSprop, contiguous
        networks.update({_name(p, "official", "contiguous", args): (p, official_limit(args.official, cfg, dev, images))
                         for p in args.precision})
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in args.kinds if k in net} for n, (_, net)
                                                in networks.items()}
    for name, (p, net) in networks.items():  # warm-up: kernels, allocator, cuDNN autotuning
        for kind in times[name]:
            for _ in range(args.warmup):
                net[kind](p)
    for _ in range(args.repeats):  # the variants alternate: drifts of the machine hit them all alike
        for name, (p, net) in networks.items():
            for kind in times[name]:
                times[name][kind] += [timed(lambda: net[kind](p)) for _ in range(args.steps)]
    phi = next(net for _, net in networks.values() if "phi" in net)["phi"]
    models = {name: {"parameters": count_parameters(net["phi"]),
                     "gflop_per_image": forward_gflop(net["phi"], images[:1])} for name, (_, net) in networks.items()
              if name.startswith(args.precision[0])}

    checks = {"backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"}
    if torch.distributed.is_initialized():  # the collectives of a run, on this backend
        sent = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64)}
        got = broadcast_arrays(sent if info.is_main else None)
        checks["broadcast_arrays"] = all(np.array_equal(got[k], v) for k, v in sent.items())
        checks["phi_checksum"] = check_replicas(phi, "after the benchmark")
    checks.update(library_checks())
    if dev.type == "cuda":
        checks["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        checks["bf16_supported"] = torch.cuda.is_bf16_supported()
    distributed.shutdown()
    return {"times": times, "checks": checks, "device": str(dev), "params_phi": count_parameters(phi),
            "threads": info.threads, "models": models}


def _name(precision: str, width: int | str, memory_format: str, args) -> str:
    """A variant's row name: the precision, then what else varies in this run."""
    parts = [precision]
    if width == "official":
        parts.append("official FAN")
    elif len(args.widths) > 1 or args.official:
        parts.append(f"width {width}")
    if memory_format != "contiguous":
        parts.append(memory_format)
    return ", ".join(parts)


def official_limit(path: Path, cfg, dev, images) -> dict:
    """The paper's official network (``model.FAN`` of a checkout of its code, which the user
    fetched: never shipped here) on the same images: forward, a loss summing its two
    outputs, backward and RMSprop, as our ``limit`` does."""
    import torch


    sys.path.insert(0, str(path))
    try:
        from model import FAN
    finally:
        sys.path.remove(str(path))
    torch.manual_seed(0)
    fan = FAN(1).to(dev)
    return {"limit": limit_step(fan, torch.optim.RMSprop(fan.parameters(), lr=cfg.stage1.lr), images), "phi": fan}


def limit_step(model, opt, images):
    """What a network costs: its forward on ``images``, a loss that only sums its two
    outputs, backward and the optimiser's step; called with the precision."""
    from k2l_dist.training.steps import autocast

    def limit(precision: str) -> None:
        with autocast(images.device, precision):
            heat, desc = model(images)
            loss = heat.float().mean() + desc.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return limit


def forward_gflop(model, image) -> float:
    """GFLOP of one image's forward pass, as torch's FLOP counter counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() / 1e9


def library_checks() -> dict:
    """Which GPU paths this machine's libraries offer (Faiss GPUs, DALI)."""
    import faiss

    out = {"faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}
    try:
        import nvidia.dali
        out["dali"] = nvidia.dali.__version__
    except ImportError:
        out["dali"] = "not installed"
    return out


def nccl_check(args) -> dict:
    """One GPU cannot hold two NCCL ranks: a group of one still runs NCCL's all-reduce under
    DDP for the real Stage-1 step, and its gradients must equal the plain module's."""
    import socket

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from k2l_dist.config import load_config
    from k2l_dist.models import KeypointNet
    from k2l_dist.training.steps import stage1_losses

    cfg = load_config(ROOT / args.config, args.overrides)
    dev = torch.device("cuda", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=dev)
    deterministic = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # comparable gradients
    try:
        batch, table = fixed_pairs(2, 64, cfg.cluster.M, dev)
        grads = []
        for wrap in (False, False, True):  # plain twice: the noise floor of this GPU's kernels
            torch.manual_seed(0)
            phi = KeypointNet(cfg.model).to(dev)
            model = DistributedDataParallel(phi, device_ids=[0]) if wrap else phi
            gen = torch.Generator().manual_seed(0)
            stage1_losses(model, batch, table, max_points=8, loss_cfg=cfg.loss, generator=gen)["loss"].backward()
            grads.append(torch.cat([p.grad.flatten() for p in phi.parameters() if p.grad is not None]))
        x = torch.ones(4, device=dev)
        dist.all_reduce(x)
        noise = float((grads[1] - grads[0]).abs().max())
        ddp = float((grads[2] - grads[0]).abs().max())
        return {"nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
                "nccl_all_reduce": x.tolist() == [1.0] * 4,
                "ddp_vs_plain_max_abs_grad_diff": ddp, "plain_vs_plain_max_abs_grad_diff": noise,
                "grad_max_abs": float(grads[0].abs().max())}
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic
        dist.destroy_process_group()


def table(result: dict, pairs: int) -> list[str]:
    rows = []
    base = None

    def ms(med: dict, kind: str) -> str:
        return f"{1000 * med[kind]:.1f}" if kind in med else "—"

    def per_s(med: dict, kind: str) -> str:
        return f"{2 * pairs / med[kind]:.0f}" if kind in med else "—"

    for name, t in result["times"].items():
        med = {k: statistics.median(v) for k, v in t.items() if v}
        ref = med.get("stage1", med.get("limit"))
        base = base or ref
        share = f"{100 * (med['stage1'] - med['limit']) / med['stage1']:.0f}%" if {"stage1", "limit"} <= set(med) \
            else "—"
        model = result["models"].get(name, {})
        size = f"{model['parameters'] / 1e6:.2f} M, {model['gflop_per_image']:.2f}" if model else "—"
        rows.append(f"| {name} | {size} | {ms(med, 'limit')} | {ms(med, 'stage1')} | {per_s(med, 'stage1')} | "
                    f"{share} | {ms(med, 'stage2')} | {per_s(med, 'extract')} | "
                    f"{f'{base / ref:.2f}' if base and ref else '—'} |")
    return rows


def official_ratios(result: dict) -> list[str]:
    """Our Stage-1 step and limit against the official FAN's forward + backward + RMSprop,
    per precision and width, from this run's medians."""
    med = {name: {k: statistics.median(v) for k, v in t.items() if v} for name, t in result["times"].items()}
    lines = []
    for name, theirs in med.items():
        if not name.endswith("official FAN"):
            continue
        precision = name.split(",")[0]
        for ours, t in med.items():
            if ours.startswith(precision + ",") and ours != name and {"stage1", "limit"} <= set(t):
                lines.append(f"- {ours}: Stage-1 step = **{t['stage1'] / theirs['limit']:.2f}×** the official FAN's "
                             f"forward + backward + RMSprop ({1000 * theirs['limit']:.0f} ms); limit alone "
                             f"{t['limit'] / theirs['limit']:.2f}×")
    return ["", *lines] if lines else []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=0, help="crop size (0: the config's)")
    p.add_argument("--pairs", type=int, default=0, help="pairs per step (0: the config's augment.batch_size)")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--formats", default="contiguous,channels_last", help="memory formats to compare")
    p.add_argument("--widths", default="", help="model widths to compare (default: the config's)")
    p.add_argument("--kinds", default="limit,stage1,stage2,extract", help="what to time, of limit, stage1, "
                                                                          "stage2, extract")
    p.add_argument("--official", type=Path, help="a checkout of the paper's official code (github "
                                                 "dimitrismallis/KeypointsToLandmarks): its FAN's limit too")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each kind first")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--section", default="", help="BENCHMARKS.md section name (default: bench_step_<device>)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write the raw times here")
    p.add_argument("--nccl-check", action="store_true", help="also run DDP over a one-rank NCCL group (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks first")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. model.width=296: 8.4 M parameters)")
    args = p.parse_args()
    args.precision = [x.strip() for x in args.precision.split(",") if x.strip()]
    args.formats = [x.strip() for x in args.formats.split(",") if x.strip()]
    args.kinds = [x.strip() for x in args.kinds.split(",") if x.strip()]
    from k2l_dist.config import load_config

    cfg = load_config(ROOT / args.config, args.overrides)
    args.size = args.size or cfg.augment.size or cfg.data.size
    args.pairs = args.pairs or cfg.augment.batch_size
    args.widths = [int(x) for x in args.widths.split(",") if x.strip()] or [cfg.model.width]
    if args.official and args.size % 64:
        p.error(f"--official needs --size divisible by 64 (the official FAN's 4-level hourglass), got {args.size}")
    result = measure(args)
    if args.nccl_check:
        result["checks"].update(nccl_check(args))
    if args.json:
        args.json.write_text(json.dumps({**result, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    shown = [a for i, a in enumerate(sys.argv[1:]) if not (a in ("--out", "--json") or
                                                          (i and sys.argv[i] in ("--out", "--json")))]
    cmd = " ".join(["python bench/bench_step.py", *shown])
    body = "\n".join([
        f"## Training step on one device ({result['device']})",
        "",
        f"`{cmd}` — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {machine()}",
        f"- `{args.config}`'s model ({result['params_phi'] / 1e6:.2f} M parameters in Φ"
        f"{', torch.compile' if args.compile else ''}) at {args.size} px, "
        f"{args.pairs} pairs per step, {result['threads']} threads; fixed in-memory pairs (no loading), "
        f"medians of {args.repeats} × {args.steps} steps",
        "- limit: Φ forward + backward + RMSprop on a loss that only sums the outputs; losses' share: "
        "(Stage-1 step − limit) / Stage-1 step; extraction: peaks, descriptors and the mirror pass",
        f"- checks: {json.dumps(result['checks'])}",
        "",
        "| variant | Φ parameters, GFLOP per image | limit ms | Stage-1 step ms | Stage-1 images/s | "
        "losses' share | Stage-2 step ms | extraction images/s | speed-up (Stage-1 step, else limit) |",
        "|---|---|---|---|---|---|---|---|---|",
        *table(result, args.pairs),
        *official_ratios(result),
    ])
    print(body)
    if args.out.name:
        write_section(args.out, args.section or f"bench_step_{result['device'].split(':')[0]}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
