"""Input pipeline of stage 2 on CPU: samples/s per core for decode + view + target read + mask on the
real ImageNet sample, per component and end to end (the training data loader without a model).

    python bench/data_pipeline.py [--batches 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cae2
from bench._common import fake_store, make_sample_shards, publish, table
from pipelines.pretrain.data import StreamConfig, index_shards, make_loader, sample_rng, view_index
from pipelines.shards import expand_shards, iter_shard, required_image_bytes
from targets.device_views import PackedImages, crop_record
from targets.store import TargetStore
from targets.views import ViewParams, apply_view, decode_image

STUDENT = "cae2_vit_base"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--workers", default="0,2", help="Comma-separated data-loader worker counts to run.")
    ap.add_argument("--repeat", type=int, default=1,
                    help="Use each image this many times (under other keys), so that many workers each get batches.")
    return ap.parse_args()


def _timed(fn, items) -> tuple[float, list]:
    """(ms per item, results) of fn over items."""
    t0 = time.perf_counter()
    out = [fn(x) for x in items]
    return (time.perf_counter() - t0) / len(items) * 1e3, out


def components(store: TargetStore, shards: Path) -> tuple[dict[str, float], list]:
    """ms per sample of each step a loader worker takes, each image once -> ({step: ms}, decoded images)."""
    samples = [(sh, row, s) for sh in expand_shards(str(shards)) for row, s in enumerate(iter_shard(sh.url))]
    samples = [x for x in samples if x[2]["__key__"].split("_", 2)[1] == "r0"]
    units = {sh.name: store.unit(sh.name) for sh, _, _ in samples}
    masker = cae2.create_mask_generator(cae2.resolve_model_config(STUDENT))
    ms = {}
    ms["decode"], images = _timed(lambda x: decode_image(required_image_bytes(x[2])), samples)
    params, records = [], []
    for sh, row, _ in samples:
        u = units[sh.name]
        k = view_index(0, 0, u.keys[row], 5)
        params.append(ViewParams.from_record(u.view_int[row, k], u.view_float[row, k]))
        records.append(u.view_int[row, k])
    ms["view"], _ = _timed(lambda ip: apply_view(ip[0], ip[1], 224, "bicubic"), list(zip(images, params, strict=True)))
    ms["crop"], crops = _timed(lambda ir: crop_record(ir[0], ir[1])[0], list(zip(images, records, strict=True)))
    t0 = time.perf_counter()
    for start in range(0, len(crops), 32):  # the worker's share of the device path: pack a batch's crops
        PackedImages.pack(crops[start:start + 32])
    ms["pack"] = (time.perf_counter() - t0) / len(crops) * 1e3
    ms["read"], _ = _timed(lambda x: units[x[0].name].read(x[1], 1), samples)
    ms["mask"], _ = _timed(lambda x: masker(sample_rng(0, 0, x[2]["__key__"])), samples)
    ms["digest"], _ = _timed(lambda x: units[x[0].name].image_changed(x[1], required_image_bytes(x[2])), samples)
    return ms, images


def end_to_end(store: TargetStore, shards: Path, batches: int, worker_counts: list[int]) -> dict[tuple, float]:
    """{(workers, view path): samples/s} through `pipelines.pretrain.data`, start-up excluded."""
    index = index_shards(store, expand_shards(str(shards)))
    model_cfg = cae2.resolve_model_config(STUDENT)
    results = {}
    for workers, view_path in [(w, p) for p in ("pillow", "device") for w in worker_counts]:
        cfg = StreamConfig(batch_size=32, seed=0, workers=workers, student_size=224, shuffle_buffer=256,
                           view_path=view_path)
        loader, plan = make_loader(store.path, store.meta, index, cfg, model_cfg, epoch=0)
        n = min(batches, plan.batches_per_rank)
        it = iter(loader)
        next(it)  # start-up (worker spawn, first shard) is not steady state
        t0 = time.perf_counter()
        for _ in range(n - 1):
            next(it)
        results[workers, view_path] = (n - 1) * 32 / (time.perf_counter() - t0)
        del it, loader
    return results


def report(ms: dict[str, float], images: list, results: dict[tuple, float], repeat: int) -> str:
    total = ms["decode"] + ms["view"] + ms["read"] + ms["mask"] + ms["digest"]
    total_device = ms["decode"] + ms["crop"] + ms["pack"] + ms["read"] + ms["mask"] + ms["digest"]
    rows = [[name, v, 1e3 / v] for name, v in (
        ("decode (Pillow, libjpeg-turbo)", ms["decode"]),
        ("Pillow view path: jitter, flip, crop, bicubic resize to 224", ms["view"]),
        ("device view path: the crop as an array", ms["crop"]),
        ("device view path: pack a batch's crops into one buffer (tables and weights: on the device)", ms["pack"]),
        ("target read: one view [197, 512] fp16 from zarr", ms["read"]),
        ("block mask (98 of 196)", ms["mask"]),
        ("image digest: crc32c of the JPEG bytes against stage 1's", ms["digest"]),
        ("sum, Pillow view path", total),
        ("sum, device view path (the views are then cut on the training device)", total_device))]
    return ("## Input pipeline (stage 2 data loader, CPU)\n\n"
            f"{len(images)} real ImageNet JPEGs (mean {np.mean([i.width * i.height for i in images]) / 1e3:.0f}k "
            "pixels), one thread, ViT-Base settings, K = 5 store of ViT-B/16-shaped latents.\n\n"
            + table(["component", "ms / sample", "samples/s per core"], rows)
            + f"\n\nThe image digest check is {100 * ms['digest'] / total:.2f}% of the Pillow view path's time per "
            f"sample and {100 * ms['digest'] / total_device:.2f}% of the device view path's."
            + "\n\nEnd to end through `pipelines.pretrain.data` (WebDataset stream, join, shuffle buffer, collate)"
            + (f", the images used {repeat} times each" if repeat > 1 else "") + ":\n\n"
            + table(["view path", "data-loader workers", "samples/s", "samples/s per core"],
                    [[p, f"{w} ({f'{w} cores' if w else 'in the main process, 1 core'})", r, r / max(w, 1)]
                     for (w, p), r in results.items()]))


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cae2-bench-data-"))
    shards = make_sample_shards(work, repeat=args.repeat)
    store = TargetStore.open(fake_store(shards, work / "targets.zarr", k=5))
    ms, images = components(store, shards)
    results = end_to_end(store, shards, args.batches, [int(w) for w in args.workers.split(",")])
    publish("data-pipeline", report(ms, images, results, args.repeat))


if __name__ == "__main__":
    main()
