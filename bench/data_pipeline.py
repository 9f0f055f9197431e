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

from bench._common import fake_store, make_sample_shards, publish, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--workers", default="0,2", help="Comma-separated data-loader worker counts to run.")
    ap.add_argument("--repeat", type=int, default=1,
                    help="Use each image this many times (under other keys), so that many workers each get batches.")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import cae2
    from pipelines.pretrain.data import StreamConfig, index_shards, make_loader, sample_rng, view_index
    from pipelines.shards import expand_shards, image_bytes, iter_shard
    from targets.device_views import PackedImages, crop_record
    from targets.store import TargetStore
    from targets.views import ViewParams, apply_view, decode_image

    work = Path(tempfile.mkdtemp(prefix="cae2-bench-data-"))
    shards = make_sample_shards(work, repeat=args.repeat)
    store_path = fake_store(shards, work / "targets.zarr", k=5)
    store = TargetStore.open(store_path)
    samples = [(sh, row, s) for sh in expand_shards(str(shards)) for row, s in enumerate(iter_shard(sh.url))]
    samples = [x for x in samples if x[2]["__key__"].split("_", 2)[1] == "r0"]  # components: each image once
    units = {sh.name: store.unit(sh.name) for sh, _, _ in samples}
    model_cfg = cae2.resolve_model_config("cae2_vit_base")
    masker = cae2.create_mask_generator(model_cfg)

    def timed(fn, items):
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        return (time.perf_counter() - t0) / len(items) * 1e3, out

    ms_decode, images = timed(lambda x: decode_image(image_bytes(x[2])), samples)
    params, records = [], []
    for sh, row, _ in samples:
        u = units[sh.name]
        k = view_index(0, 0, u.keys[row], 5)
        params.append(ViewParams.from_record(u.view_int[row, k], u.view_float[row, k]))
        records.append(u.view_int[row, k])
    ms_view, _ = timed(lambda ip: apply_view(ip[0], ip[1], 224, "bicubic"), list(zip(images, params, strict=True)))
    ms_crop, crops = timed(lambda ir: crop_record(ir[0], ir[1])[0], list(zip(images, records, strict=True)))
    t0 = time.perf_counter()
    for start in range(0, len(crops), 32):  # the worker's share of the device path: pack a batch's crops
        PackedImages.pack(crops[start:start + 32])
    ms_pad = (time.perf_counter() - t0) / len(crops) * 1e3
    ms_read, _ = timed(lambda x: units[x[0].name].read(x[1], 1), samples)
    ms_mask, _ = timed(lambda x: masker(sample_rng(0, 0, x[2]["__key__"])), samples)

    index = index_shards(store, expand_shards(str(shards)))
    results = {}
    worker_counts = [int(w) for w in args.workers.split(",")]
    for workers, view_path in [(w, p) for p in ("pillow", "device") for w in worker_counts]:
        cfg = StreamConfig(batch_size=32, seed=0, workers=workers, student_size=224, shuffle_buffer=256,
                           view_path=view_path)
        loader, plan = make_loader(str(store_path), store.meta, index, cfg, model_cfg, epoch=0)
        n = min(args.batches, plan.batches_per_rank)
        it = iter(loader)
        next(it)  # start-up (worker spawn, first shard) is not steady state
        t0 = time.perf_counter()
        for _ in range(n - 1):
            next(it)
        results[workers, view_path] = (n - 1) * 32 / (time.perf_counter() - t0)
        del it, loader

    total = ms_decode + ms_view + ms_read + ms_mask
    total_device = ms_decode + ms_crop + ms_pad + ms_read + ms_mask
    rows = [["decode (Pillow, libjpeg-turbo)", ms_decode, 1e3 / ms_decode],
            ["Pillow view path: jitter, flip, crop, bicubic resize to 224", ms_view, 1e3 / ms_view],
            ["device view path: the crop as an array", ms_crop, 1e3 / ms_crop],
            ["device view path: pack a batch's crops into one buffer (tables and weights: on the device)", ms_pad,
             1e3 / ms_pad],
            ["target read: one view [197, 512] fp16 from zarr", ms_read, 1e3 / ms_read],
            ["block mask (98 of 196)", ms_mask, 1e3 / ms_mask],
            ["sum, Pillow view path", total, 1e3 / total],
            ["sum, device view path (the views are then cut on the training device)", total_device,
             1e3 / total_device]]
    body = ("## Input pipeline (stage 2 data loader, CPU)\n\n"
            f"{len(samples)} real ImageNet JPEGs (mean {np.mean([i.width * i.height for i in images]) / 1e3:.0f}k "
            "pixels), one thread, ViT-Base settings, K = 5 store of ViT-B/16-shaped latents.\n\n"
            + table(["component", "ms / sample", "samples/s per core"], rows)
            + "\n\nEnd to end through `pipelines.pretrain.data` (WebDataset stream, join, shuffle buffer, collate)"
            + (f", the images used {args.repeat} times each" if args.repeat > 1 else "") + ":\n\n"
            + table(["view path", "data-loader workers", "samples/s", "samples/s per core"],
                    [[p, f"{w} ({f'{w} cores' if w else 'in the main process, 1 core'})", r, r / max(w, 1)]
                     for (w, p), r in results.items()]))
    publish("data-pipeline", body)


if __name__ == "__main__":
    main()
