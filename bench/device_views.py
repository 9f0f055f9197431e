"""The device view path against the Pillow path on the real ImageNet sample: pixel differences and the
teacher's latents of both views of the same parameters (fidelity), and where the device path's time
goes, host and device apart.

    python -m bench.device_views [--images 300] [--views 2] [--teacher ViT-B-16] [--batch-size 512]

Host work per view besides decoding is what the main process does for a batch of decoded images:
pack them into one (pinned) buffer, stack the views' records, plan the launches from them, launch.
The views' parameters are drawn in the loader workers (`sample_view`), reported on their own line.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench._common import publish, sample_images, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--views", type=int, default=5, help="K, stage 1's default: the host copies each image once")
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()

    from targets.device_views import DeviceViews, Packer, use_kernels
    from targets.teacher import Teacher, TeacherSpec
    from targets.views import ViewSettings, apply_view, decode_image, measure_view, sample_view

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = sample_images(args.images)
    t0 = time.perf_counter()
    images = [decode_image(p.read_bytes()) for p in files]
    ms_decode = (time.perf_counter() - t0) / len(images) * 1e3
    arrays = [np.asarray(img) for img in images]
    t0 = time.perf_counter()
    sampled = [[sample_view(ViewSettings(), 0, p.stem, k, (img.height, img.width)) for k in range(args.views)]
               for p, img in zip(files, images, strict=True)]
    us_sample = (time.perf_counter() - t0) / (len(images) * args.views) * 1e6
    records = [[v.to_record() for v in views] for views in sampled]  # what the workers hand on, per image
    view_int = [np.stack([r[0] for r in recs]) for recs in records]
    view_float = [np.stack([r[1] for r in recs]) for recs in records]
    teacher = Teacher(TeacherSpec(name=args.teacher, pretrained="none"), device=device)
    views = DeviceViews(teacher.image_size, teacher.interpolation, device)
    per_image = args.batch_size // args.views
    batches = [range(s, min(s + per_image, len(images))) for s in range(0, len(images), per_image)]

    packer = Packer(device)  # its host buffers are allocated once, as in a run: warm every one of them up
    for _ in range(-(-len(packer.buffers) // len(batches))):
        run(views, packer, arrays, view_int, view_float, batches, device)
    out, spent = run(views, packer, arrays, view_int, view_float, batches, device)
    n_views = len(images) * args.views
    params = [measure_view(v, img) for vs, img in zip(sampled, images, strict=True) for v in vs]
    owner = [i for i in range(len(images)) for _ in range(args.views)]
    t0 = time.perf_counter()
    pillow = torch.stack([apply_view(images[i], p, teacher.image_size, teacher.interpolation)
                          for i, p in zip(owner, params, strict=True)])
    ms_pillow = (time.perf_counter() - t0) / n_views * 1e3
    diff = (out.int() - pillow.int()).abs()
    cos = torch.cat([F.cosine_similarity(teacher(pillow[s:s + 256]), teacher(out[s:s + 256]), dim=-1).flatten()
                     for s in range(0, n_views, 256)])
    renderer = "Triton kernels" if use_kernels(device) else "the plain-torch renderer"
    where = f"{device} ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "cpu"
    host = spent["host: pack images, stack records, plan, launch"]
    body = ("## Device view path: fidelity and cost\n\n"
            f"{len(images)} real ImageNet JPEGs x K = {args.views} views ({n_views}), default view settings, "
            f"{teacher.image_size} px {teacher.interpolation}; device path on {where} with {renderer}, batches of "
            f"{args.batch_size} views; teacher {args.teacher} (random weights) {teacher.precision} on both paths' "
            "views of the same parameters.\n\n"
            + table(["measure", "value"], [
                ["views whose pixels differ from the Pillow path", f"{int((diff.flatten(1).amax(1) > 0).sum())} of "
                                                                    f"{n_views}"],
                ["max abs pixel difference (levels)", int(diff.max())],
                ["teacher latents, min token cosine (goal >= 0.9999)", f"{float(cos.min()):.6f}"],
                ["host: decode (Pillow), ms per image", ms_decode],
                ["host: Pillow view (jitter, flip, crop, resize), ms per view", ms_pillow],
                ["host, loader workers: view parameters (sample_view), us per view", us_sample],
                ["host, main process, besides decoding: us per view (goal <= 5)", host],
                *[[f"  {name} (us per view)", us] for name, us in spent.items()],
            ]))
    publish("device-views", body)


def run(views, packer, arrays, view_int, view_float, batches, device) -> tuple[torch.Tensor, dict[str, float]]:
    """Every batch through the device path, each step timed (synchronised) -> (views, us per view by step)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    spent = dict.fromkeys(("host: pack images, stack records, plan, launch", "images and records to the device",
                           "device: contrast means", "device: tables, coefficients, render"), 0.0)
    outs, n = [], 0
    for b in batches:
        t = time.perf_counter()
        packed = packer.to_device([arrays[i] for i in b])  # the copy to a GPU is queued, not waited for
        ints = torch.from_numpy(np.concatenate([view_int[i] for i in b]))
        floats = torch.from_numpy(np.concatenate([view_float[i] for i in b]))
        owner = torch.from_numpy(np.repeat(np.arange(len(b)), [len(view_int[i]) for i in b]))
        plan = views.plan(packed, owner, ints, floats)
        spent["host: pack images, stack records, plan, launch"] += time.perf_counter() - t
        t = time.perf_counter()
        ints, floats, owner = ints.to(device), floats.to(device), owner.to(device)
        sync()
        spent["images and records to the device"] += time.perf_counter() - t
        t = time.perf_counter()
        ints = views.measure(packed, owner, ints, floats, plan)
        sync()
        spent["device: contrast means"] += time.perf_counter() - t
        t = time.perf_counter()
        outs.append(views.render(packed, owner, ints, floats, plan))
        sync()
        spent["device: tables, coefficients, render"] += time.perf_counter() - t
        n += len(owner)
    return torch.cat(outs).cpu(), {k: v / n * 1e6 for k, v in spent.items()}


if __name__ == "__main__":
    main()
