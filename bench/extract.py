"""Stage 1 efficiency and storage: extract-targets views/s vs the teacher's forward alone on in-memory
batches (same teacher, batch and precision), and bytes on disk per view vs the raw (1 + T) x D x 2.

    python -m bench.extract [--images 96] [--views 2] [--teacher ViT-B-16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench._common import make_sample_shards, publish, rate, table


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=1, help="Use each image this many times (under other keys).")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    from pipelines.extract import ExtractConfig, run_extract
    from targets.cache import TargetStore
    from targets.teacher import Teacher, TeacherSpec

    work = Path(tempfile.mkdtemp(prefix="cae2-bench-extract-"))
    units = max(4, 2 * args.workers)  # stage 1 gives each decode worker whole shards
    shards = make_sample_shards(work, n=args.images, per_shard=max(args.images * args.repeat // units, 1),
                                repeat=args.repeat)
    spec = TeacherSpec(name=args.teacher, pretrained="none")  # random weights: the speed is the same
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = Teacher(spec, device=device)
    n_views = args.images * args.repeat * args.views
    batch = torch.randint(0, 256, (args.batch_size, 3, teacher.image_size, teacher.image_size), dtype=torch.uint8)
    calls = -(-n_views // args.batch_size)  # the same number of views as the extraction

    def forward_only() -> float:
        """Views/s of the teacher alone on in-memory batches."""
        return rate(lambda: teacher(batch), calls, args.batch_size)

    before = forward_only()
    store = work / "targets.zarr"
    stats = run_extract(ExtractConfig(shards=str(shards), out=str(store), teacher=spec, views_per_image=args.views,
                                      batch_size=args.batch_size, workers=args.workers, progress=False),
                        log=lambda m: None)
    end_to_end = stats.views / stats.seconds
    forward = (before + forward_only()) / 2  # measured before and after: slow drifts of the machine cancel
    meta = TargetStore.open(store).meta
    raw = meta.num_tokens * meta.latent_dim * 2
    on_disk = du(store / "units")
    body = ("## Stage 1 efficiency and storage\n\n"
            f"Teacher {args.teacher} (random weights; speed only) on {device}, {teacher.precision}, batch "
            f"{args.batch_size}; {args.images} real ImageNet JPEGs{f' x {args.repeat}' if args.repeat > 1 else ''} "
            f"x K = {args.views}; {args.workers} decode "
            "worker(s).\n\n"
            + table(["measure", "value"], [
                ["teacher forward only, in-memory uint8 batches (views/s; mean of before and after)", forward],
                ["extract-targets end to end (views/s)", end_to_end],
                ["**efficiency** (end to end / forward only; goal >= 0.9)", end_to_end / forward],
                ["raw latents per view, (1 + T) x D x 2 (bytes)", raw],
                ["on disk per view, everything under units/ (bytes)", on_disk / stats.views],
                ["**storage overhead** (on disk / raw)", on_disk / stats.views / raw],
            ]))
    publish("extract", body)


if __name__ == "__main__":
    main()
