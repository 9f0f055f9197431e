"""What the cache buys: training samples/s with cached targets vs `--teacher-online` (same student, data,
batch), against the ratio predicted by FLOPs: (student train + teacher forward) / student train.

    python -m bench.speedup [--images 64] [--steps 12] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench._common import ROOT, make_sample_shards, publish, table


def flops_per_sample(student: str, teacher_name: str) -> tuple[float, float]:
    """(student fwd+bwd FLOPs, teacher fwd FLOPs) per image, counted by torch's FlopCounterMode.

    Counted with the math attention kernel and without nn.MultiheadAttention's fused inference path:
    the counter does not see inside those fused CPU kernels (it would report 22.7 instead of 35.3
    GFLOPs for the ViT-B/16 tower).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import cae2
    from targets.teacher import Teacher, TeacherSpec

    model = cae2.create_model(student)
    cfg = model.cfg
    gen = cae2.create_mask_generator(cfg)
    import numpy as np

    mask = torch.from_numpy(np.stack([gen(np.random.default_rng(i)) for i in range(2)]))
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    torch.backends.mha.set_fastpath_enabled(False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, mask).float().pow(2).mean().backward()
    student_flops = counter.get_total_flops() / 2
    teacher = Teacher(TeacherSpec(name=teacher_name, pretrained="none"))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        teacher(torch.zeros(2, 3, teacher.image_size, teacher.image_size, dtype=torch.uint8))
    torch.backends.mha.set_fastpath_enabled(True)
    return student_flops, counter.get_total_flops() / 2


def samples_per_s(run: Path, skip_first: int = 1) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = records[skip_first:] or records
    return sum(r["samples_per_s"] for r in steady) / len(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--students", default="cae2_vit_tiny,cae2_vit_small")
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--workers", default=None,
                    help="Comma-separated data-loader worker counts, one pair of runs each (default: 0,1 on CPU, "
                         "where a worker process competes with the training threads for the cores; 8 on a GPU).")
    args = ap.parse_args()

    from pipelines.extract import ExtractConfig, run_extract
    from targets.teacher import TeacherSpec

    work = Path(tempfile.mkdtemp(prefix="cae2-bench-speedup-"))
    shards = make_sample_shards(work, n=args.images, per_shard=max(args.images // 2, 1))
    store = work / "targets.zarr"
    run_extract(ExtractConfig(shards=str(shards), out=str(store), views_per_image=1, workers=1, progress=False,
                              teacher=TeacherSpec(name=args.teacher, pretrained="none")), log=lambda m: None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worker_counts = [int(w) for w in (args.workers or ("8" if device == "cuda" else "0,1")).split(",")]
    rows = []
    for student in args.students.split(","):
        s_flops, t_flops = flops_per_sample(student, args.teacher)
        predicted = (s_flops + t_flops) / s_flops
        for workers in worker_counts:
            rates = {}
            for mode in ("cache", "online"):
                run = work / f"{student}-{mode}-w{workers}"
                cmd = [sys.executable, "-m", "pipelines.cli", "pretrain", "--shards", str(shards), "--targets",
                       str(store), "--model", student, "--out", str(run), "--steps", str(args.steps), "--batch-size",
                       str(args.batch_size), "--workers", str(workers), "--log-every", "2", "--save-every", "100000",
                       "--allow-random-teacher", "--mixed-precision", args.mixed_precision]
                if mode == "online":
                    cmd.append("--teacher-online")
                subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
                rates[mode] = samples_per_s(run)
            measured = rates["cache"] / rates["online"]
            rows.append([student, workers, s_flops / 1e9, t_flops / 1e9, rates["online"], rates["cache"], measured,
                         predicted, measured / predicted])
    body = ("## Speedup of cached targets over an online teacher\n\n"
            f"Teacher {args.teacher} (random weights; speed only), batch {args.batch_size} per step, "
            f"{args.steps} steps (first logging window dropped), {args.images} real ImageNet JPEGs, {device}, "
            f"mixed precision {args.mixed_precision}. Both runs of a pair use the same data-loader workers.\n\n"
            + table(["student", "loader workers", "student train GFLOPs/img", "teacher fwd GFLOPs/img",
                     "online samples/s", "cached samples/s", "measured speedup", "FLOPs-predicted",
                     "**measured / predicted** (goal >= 0.9)"], rows))
    publish("speedup", body)


if __name__ == "__main__":
    main()
