"""Fine-tuning throughput of `cae2 evaluate finetune` (Table 9's recipe: RandAugment, Mixup/CutMix,
random erasing, layer-decayed AdamW) in samples/s per optimizer step, on the real ImageNet sample
arranged as 3 classes. It measures speed, not accuracy.

    python -m bench.finetune [--model timm:vit_tiny_patch16_224:random] [--images 96] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench._common import publish, sample_images, table
from pipelines.cli import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="timm:vit_tiny_patch16_224:random")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--input-size", type=int, default=224)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cae2-bench-finetune-"))
    for split in ("train", "val"):
        for i, p in enumerate(sample_images(args.images)):
            folder = work / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / p.name).symlink_to(p)
    out = work / "run"
    t0 = time.perf_counter()
    status = run(["evaluate", "finetune", "--model", args.model, "--train", str(work / "train"), "--val",
                  str(work / "val"), "--out", str(out), "--epochs", "1", "--batch-size", str(args.batch_size),
                  "--global-batch", str(args.global_batch), "--workers", str(args.workers), "--input-size",
                  str(args.input_size), "--log-every", "1", "--no-progress"])
    seconds = time.perf_counter() - t0
    if status:
        raise SystemExit(f"the fine-tuning run failed with status {status}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]  # the first step warms up
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [[args.model, args.input_size, args.global_batch, len(rates) + 1, sum(rates) / max(len(rates), 1),
             seconds]]
    body = ("## Fine-tuning throughput\n\n"
            f"`cae2 evaluate finetune` with the model's Table 9 recipe (RandAugment, Mixup/CutMix, random erasing, "
            f"layer-decayed AdamW) on {args.images} real ImageNet JPEGs as 3 classes, {args.workers} decode "
            f"worker(s), {device}, {torch.get_num_threads()} compute threads; samples/s per optimizer step after "
            "the first, and the whole run (start-up and one validation included).\n\n"
            + table(["model", "px", "global batch", "steps", "samples/s per step", "run (s)"], rows))
    publish("finetune", body)


if __name__ == "__main__":
    main()
