"""int8 target stores against fp16: bytes per view, the error the markers record, a short pretrain on
each (same seed), and stage 2's target reads and loader rate.

    python -m bench.int8 [--images 300] [--views 2] [--teacher ViT-B-16] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cae2
from bench._common import ROOT, make_sample_shards, publish, table
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.pretrain.data import StreamConfig, index_shards, make_loader
from pipelines.shards import expand_shards
from targets.store import TargetStore
from targets.teacher import TeacherSpec


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--student", default="cae2_vit_tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    return ap.parse_args()


def extract_both(args: argparse.Namespace, shards: Path, work: Path) -> tuple[dict, dict, dict]:
    """The same shards extracted as fp16 and int8 -> ({format: store path}, {format: seconds}, {format: stats})."""
    spec = TeacherSpec(name=args.teacher, pretrained="none")
    stores, seconds, stats = {}, {}, {}
    for fmt in ("fp16", "int8"):
        stores[fmt] = work / f"{fmt}.zarr"
        t0 = time.perf_counter()
        stats[fmt] = run_extract(ExtractConfig(shards=str(shards), out=str(stores[fmt]), teacher=spec,
                                               progress=False, views_per_image=args.views, workers=args.workers,
                                               latent_format=fmt))
        seconds[fmt] = time.perf_counter() - t0
    return stores, seconds, stats


def read_back(a: TargetStore, b: TargetStore, views: int) -> tuple[torch.Tensor, float]:
    """Token cosines of the same views' int8 and fp16 targets, read back, and the latents' max abs value."""
    cos = []
    for name in a.unit_names():
        ua, ub = a.unit(name), b.unit(name)
        for row in map(int, np.flatnonzero(ua.valid)):
            for k in range(views):
                cos.append(torch.nn.functional.cosine_similarity(torch.from_numpy(ua.read(row, k)).float(),
                                                                 torch.from_numpy(ub.read(row, k)), dim=-1))
    return torch.cat(cos), max(float(np.abs(a.unit(n).latents[:]).max()) for n in a.unit_names())


def pretrain_losses(args: argparse.Namespace, shards: Path, stores: dict, work: Path, target_dim: int) -> dict:
    """{format: the loss of every step} of a short pretrain on each store, same seed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    losses = {}
    for fmt, store in stores.items():
        run = work / f"run-{fmt}"
        cmd = [sys.executable, "-m", "pipelines.cli", "pretrain", "--shards", str(shards), "--targets", str(store),
               "--model", args.student, "--out", str(run), "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--workers", "0", "--log-every", "1", "--allow-random-teacher", "--target-dim",
               str(target_dim), "--view-path", "pillow"]
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        losses[fmt] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return losses


def stage2_reads(args: argparse.Namespace, shards: Path, stores: dict[str, TargetStore]) -> tuple[dict, dict]:
    """Per format: ms per target read as stored, and the loader's samples/s on one core."""
    index = index_shards(stores["fp16"], expand_shards(str(shards)))
    model_cfg = cae2.resolve_model_config(args.student, target_dim=stores["fp16"].meta.latent_dim)
    read_ms, loader = {}, {}
    for fmt, store in stores.items():
        units = [store.unit(n) for n in store.unit_names()]
        picks = [(u, int(r), int(r) % args.views) for u in units for r in np.flatnonzero(u.valid)]
        t0 = time.perf_counter()
        for u, r, k in picks:
            u.read_stored(r, k)
        read_ms[fmt] = (time.perf_counter() - t0) / len(picks) * 1e3
        batch = min(32, sum(len(i.rows) for i in index))
        cfg = StreamConfig(batch_size=batch, seed=0, workers=0, student_size=model_cfg.img_size, shuffle_buffer=64,
                           view_path="pillow")
        dl, plan = make_loader(str(store.path), store.meta, index, cfg, model_cfg, epoch=0)
        it = iter(dl)
        next(it)
        n = max(min(6, plan.batches_per_rank) - 1, 1)
        it = iter(dl) if plan.batches_per_rank == 1 else it
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        loader[fmt] = n * batch / (time.perf_counter() - t0)
    return read_ms, loader


def main() -> None:
    args = parse()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="cae2-bench-int8-"))
    shards = make_sample_shards(work, n=args.images, per_shard=max(args.images // 6, 1))
    paths, seconds, stats = extract_both(args, shards, work)
    stores = {fmt: TargetStore.open(path) for fmt, path in paths.items()}
    cos, max_abs = read_back(stores["fp16"], stores["int8"], args.views)
    losses = pretrain_losses(args, shards, paths, work, stores["fp16"].meta.latent_dim)
    read_ms, loader = stage2_reads(args, shards, stores)
    meta, views, q = stores["fp16"].meta, stats["fp16"].views, stats["int8"].quant
    size = {fmt: du(path / "units") / views for fmt, path in paths.items()}
    raw = meta.num_tokens * meta.latent_dim
    loss_gap = max(abs(x - y) for x, y in zip(losses["fp16"], losses["int8"], strict=True))
    body = ("## int8 target stores\n\n"
            f"{args.images} real ImageNet JPEGs x K = {args.views} ({views} views), teacher {args.teacher} "
            f"(random weights: the figures users with real weights read come from their own markers), "
            f"{meta.num_tokens} tokens x {meta.latent_dim}.\n\n"
            + table(["measure", "fp16", "int8"], [
                ["bytes per view on disk (everything under units/)", size["fp16"], size["int8"]],
                ["raw bytes per view: latents (+ float32 scales)", raw * 2, raw + meta.num_tokens * 4],
                ["**on disk, int8 / fp16** (goal <= 0.52)", "", f"{size['int8'] / size['fp16']:.4f}"],
                ["extract-targets wall time (s)", seconds["fp16"], seconds["int8"]],
                ["min token cosine to the teacher's output (marker)", "", f"{q.min_cosine:.6f}"],
                ["mean token cosine to the teacher's output (marker)", "", f"{q.mean_cosine:.6f}"],
                ["max abs error (marker; latents' max abs value)", "", f"{q.max_abs_error:.3g} ({max_abs:.3g})"],
                ["min token cosine, int8 vs fp16 store, read back", "", f"{float(cos.min()):.6f}"],
                [f"{args.student} pretrain loss, step 1 / {args.steps} (same seed)",
                 f"{losses['fp16'][0]:.5f} / {losses['fp16'][-1]:.5f}", f"{losses['int8'][0]:.5f} / "
                 f"{losses['int8'][-1]:.5f}"],
                ["max abs loss difference over the run", "", f"{loss_gap:.2e}"],
                ["stage 2: target read per sample, as stored (microseconds)", f"{read_ms['fp16'] * 1e3:.1f}",
                 f"{read_ms['int8'] * 1e3:.1f}"],
                ["stage 2: bytes read per sample (targets)", raw * 2, raw + meta.num_tokens * 4],
                ["stage 2: loader, 1 core, Pillow view path (samples/s)", loader["fp16"], loader["int8"]],
            ]))
    publish("int8", body)


if __name__ == "__main__":
    main()
