"""Object storage against local disk, on a real S3-compatible server (SeaweedFS on this host, started here):
stage 1's views/s with shards and store in the bucket; stage 2's epoch (open, index, every batch) cold (an
empty local cache) and warm; the requests each makes per unit; the time to open an ImageNet-sized store
(1,282 units); checkpoint upload and download in MB/s.

A bucket of a cloud provider adds its latency (10-50 ms a request) and its bandwidth; the request counts
carry over as they are (they set the bill: see docs/guide.md).

    python -m bench.object_store [--images 64] [--views 2] [--teacher ViT-B-16] [--units 1282]
        [--checkpoint-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cae2
from bench._common import fake_store, make_sample_shards, publish, table
from bench.s3_server import BUCKET, serving
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.pretrain.data import StreamConfig, index_shards, make_loader
from pipelines.run_dirs import RunDir
from pipelines.shards import expand_shards
from targets import local_copies
from targets.storage import REQUESTS, Location
from targets.store import TargetStore
from targets.teacher import TeacherSpec

KINDS = ("get", "head", "list", "put", "delete")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64, help="Images for stage 1 (stage 2 uses the whole sample).")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--units", type=int, default=1282, help="Units of the store whose opening is timed.")
    ap.add_argument("--checkpoint-mib", type=int, default=1024, help="Checkpoint size (ViT-Base + AdamW: ~1 GiB).")
    return ap.parse_args()


def upload_tree(folder: Path, url: str) -> None:
    """Every file under folder to url (32 in flight); each unit's zarr.json after its other files."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.name == "zarr.json")
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(lambda p: (Location.of(url) / str(p.relative_to(folder))).upload(p), files))


class Measured:
    """Seconds and storage requests (by kind) of a block; `fresh_cache` starts it on an empty local cache."""

    def __init__(self, work: Path, fresh_cache: bool = False):
        self.work, self.fresh = work, fresh_cache
        self.seconds, self.requests = 0.0, Counter()

    def __enter__(self) -> Measured:
        if self.fresh:
            root = self.work / f"cache-{time.monotonic_ns()}"
            local_copies.configure(str(root), 100.0)
        self.before, self.t0 = Counter(REQUESTS), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.requests = Counter(REQUESTS) - self.before

    def per(self, units: int) -> str:
        return ", ".join(f"{k} {self.requests[k] / units:.1f}" for k in KINDS if self.requests[k]) or "none"


def stage1(args: argparse.Namespace, work: Path, shards: Path) -> tuple[list[list], str]:
    """extract-targets (one process, decoding in it so that every request is counted) on disk and on the bucket,
    alternately, twice each: the better run of each counts (the server shares this host's cores)."""
    upload_tree(shards, f"s3://{BUCKET}/stage1/shards")
    spec = TeacherSpec(name=args.teacher, pretrained="none")  # random weights: the speed is the same
    units = len(expand_shards(str(shards)))
    best: dict[str, float] = {}
    requests = ""
    for attempt in range(2):
        for where, src, out in (("local disk", str(shards), str(work / f"stage1-{attempt}.zarr")),
                                ("bucket", f"s3://{BUCKET}/stage1/shards", f"s3://{BUCKET}/stage1/t{attempt}.zarr")):
            with Measured(work, fresh_cache=True) as m:
                stats = run_extract(ExtractConfig(shards=src, out=out, teacher=spec, views_per_image=args.views,
                                                  batch_size=32, workers=0, progress=False, view_path="pillow"))
            best[where] = max(best.get(where, 0.0), stats.views / m.seconds)
            requests = m.per(units) if where == "bucket" else requests
    rows = [["local disk", best["local disk"], "-"], ["bucket", best["bucket"], requests],
            ["**bucket / local disk**", best["bucket"] / best["local disk"], ""]]
    return rows, (f"{args.images} real ImageNet JPEGs x K = {args.views} in {units} shards, teacher {args.teacher} "
                  "(random weights) on CPU, batch 32, decoding in the main process; the better of two runs each")


def epoch(url: str, shards_url: str) -> int:
    """Stage 2's start and one epoch of its data loader (a ViT-Base student's settings): samples read."""
    store = TargetStore.open(url)
    index = index_shards(store, expand_shards(shards_url))
    cfg = StreamConfig(batch_size=32, seed=0, workers=0, student_size=224, shuffle_buffer=256, view_path="pillow")
    loader, _ = make_loader(store.path, store.meta, index, cfg, cae2.resolve_model_config("cae2_vit_base"), 0)
    return sum(len(batch["keys"]) for batch in loader)


def stage2(work: Path, shards: Path) -> tuple[list[list], str]:
    """One epoch on disk, then on the bucket with an empty cache (cold) and again (warm)."""
    local = fake_store(shards, work / "stage2.zarr", k=5)
    bucket_shards, bucket_store = f"s3://{BUCKET}/stage2/shards", f"s3://{BUCKET}/stage2/t.zarr"
    upload_tree(shards, bucket_shards)
    upload_tree(local, bucket_store)
    units = len(expand_shards(str(shards)))
    rows = []
    with Measured(work) as m:
        n = epoch(str(local), str(shards))
    rows.append(["local disk", n / m.seconds, "-"])
    with Measured(work, fresh_cache=True) as m:
        n = epoch(bucket_store, bucket_shards)
    rows.append(["bucket, cold (empty local cache)", n / m.seconds, m.per(units)])
    with Measured(work) as m:
        n = epoch(bucket_store, bucket_shards)
    rows.append(["bucket, warm (the epoch's copies kept)", n / m.seconds, m.per(units)])
    return rows, (f"{n} samples in {units} shards (K = 5 ViT-B/16-shaped latents, 1 MB a sample), a ViT-Base "
                  "student's settings, batch 32, one process; the time includes opening the store and indexing")


def many_units(args: argparse.Namespace, work: Path, shards: Path) -> tuple[list[list], str]:
    """Open and index a store of --units units (copies of one small unit and its one-image shard)."""
    (first,) = shards.glob("*.tar")
    store = fake_store(shards, work / "t.zarr", tokens=5, dim=8)
    unit = store / "units" / first.name  # a unit is named after its shard's file
    for i in range(1, args.units):
        shutil.copy2(first, shards / f"unit-{i:06d}.tar")
        shutil.copytree(unit, store / "units" / f"unit-{i:06d}.tar")
    upload_tree(shards, f"s3://{BUCKET}/open/shards")
    upload_tree(store, f"s3://{BUCKET}/open/t.zarr")

    def open_and_index(url: str, shards_url: str) -> None:
        index_shards(TargetStore.open(url), expand_shards(shards_url))

    rows = []
    for what, url, shards_url, fresh in (("local disk", str(store), str(shards), False),
                                         ("bucket, cold", f"s3://{BUCKET}/open/t.zarr", f"s3://{BUCKET}/open/shards",
                                          True),
                                         ("bucket, warm", f"s3://{BUCKET}/open/t.zarr", f"s3://{BUCKET}/open/shards",
                                          False)):
        with Measured(work, fresh_cache=fresh) as m:
            open_and_index(url, shards_url)
        rows.append([what, m.seconds, ", ".join(f"{k} {m.requests[k]}" for k in KINDS if m.requests[k]) or "-"])
    return rows, f"{args.units} units and shards (ImageNet-1K in shards of 1,000 images), 32 requests in flight"


def checkpoint(args: argparse.Namespace, work: Path) -> tuple[list[list], str]:
    """A checkpoint pushed to a run dir in the bucket, then fetched by a resume on an empty cache."""
    local_copies.configure(str(work / "cache-checkpoint"), 100.0)
    run = RunDir(f"s3://{BUCKET}/run")
    folder = run.local / "checkpoints" / "step_00001000"
    folder.mkdir(parents=True)
    model_mib = args.checkpoint_mib // 3  # AdamW keeps two moments per weight
    sizes = {"model.safetensors": model_mib, "optimizer.bin": args.checkpoint_mib - model_mib}
    for name, mib in sizes.items():
        with open(folder / name, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    (folder / "COMPLETE").write_text("{}")
    with Measured(work) as up:
        run.push_checkpoint("step_00001000")
    local_copies.configure(str(work / "cache-resume"), 100.0)
    with Measured(work) as down:
        RunDir(f"s3://{BUCKET}/run").pull_checkpoint("step_00001000")
    mb = args.checkpoint_mib * 2**20 / 1e6
    return ([["upload (push_checkpoint: 16 MiB parts, 8 in flight)", mb / up.seconds, up.seconds],
             ["download (a resume's pull_checkpoint)", mb / down.seconds, down.seconds]],
            f"{args.checkpoint_mib} MiB in model.safetensors and optimizer.bin")


def main() -> None:
    args = parse()
    work = Path(tempfile.mkdtemp(prefix="cae2-bench-s3-"))
    try:
        with serving(work / "server"):
            s1, s1_note = stage1(args, work / "s1", make_sample_shards(work / "s1", n=args.images, per_shard=16))
            s2, s2_note = stage2(work / "s2", make_sample_shards(work / "s2", per_shard=50))
            opened, open_note = many_units(args, work / "open", make_sample_shards(work / "open", n=1, per_shard=1))
            ckpt, ckpt_note = checkpoint(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = ("## Object storage (SeaweedFS on this host)\n\n"
            "The same jobs on an S3 bucket and on local disk. The server runs on this host: a cloud bucket adds "
            "its latency and bandwidth; the requests carry over as they are.\n\n"
            f"Stage 1, {s1_note}:\n\n" + table(["shards and store on", "views/s", "requests per unit"], s1)
            + f"\n\nStage 2, {s2_note}:\n\n" + table(["shards and store on", "samples/s", "requests per unit"], s2)
            + f"\n\nOpening a store, {open_note}:\n\n" + table(["store on", "seconds", "requests"], opened)
            + f"\n\nCheckpoints, {ckpt_note}:\n\n" + table(["transfer", "MB/s", "seconds"], ckpt))
    publish("object-store", body)


if __name__ == "__main__":
    main()
