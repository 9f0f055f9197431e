"""The device view path against the Pillow path on the real ImageNet sample: pixel differences and the
teacher's latents of both views of the same parameters (fidelity), and the cost of each path.

    python -m bench.device_views [--images 300] [--views 2] [--teacher ViT-B-16] [--batch-size 256]
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
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    from targets.device_views import DeviceViews, crop_box
    from targets.teacher import Teacher, TeacherSpec
    from targets.views import ViewSettings, apply_view, decode_image, measure_view, sample_view

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    files = sample_images(args.images)
    t0 = time.perf_counter()
    images = [decode_image(p.read_bytes()) for p in files]
    ms_decode = (time.perf_counter() - t0) / len(images) * 1e3
    params, owners = [], []
    for i, (path, img) in enumerate(zip(files, images, strict=True)):
        for k in range(args.views):
            params.append(measure_view(sample_view(ViewSettings(), 0, path.stem, k, (img.height, img.width)), img))
            owners.append(i)
    teacher = Teacher(TeacherSpec(name=args.teacher, pretrained="none"), device=device)
    size, interp = teacher.image_size, teacher.interpolation

    t0 = time.perf_counter()
    pillow = torch.stack([apply_view(images[i], p, size, interp) for i, p in zip(owners, params, strict=True)])
    ms_pillow = (time.perf_counter() - t0) / len(params) * 1e3

    arrays = [np.asarray(img) for img in images]
    t0 = time.perf_counter()
    crops = [np.ascontiguousarray(crop_box(arrays[i], p)) for i, p in zip(owners, params, strict=True)]
    ms_crop = (time.perf_counter() - t0) / len(params) * 1e3
    views = DeviceViews(size, interp, device)
    batches = [range(s, min(s + args.batch_size, len(params))) for s in range(0, len(params), args.batch_size)]
    device_crops = [torch.from_numpy(c).to(device) for c in crops]

    def run_device() -> torch.Tensor:
        return torch.cat([views.make([device_crops[i] for i in b], [params[i] for i in b]) for b in batches])

    run_device()  # warm-up (coefficient caches, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    device_views = run_device()
    if device.type == "cuda":
        torch.cuda.synchronize()
    us_device = (time.perf_counter() - t0) / len(params) * 1e6
    device_views = device_views.cpu()
    parts = where_the_time_goes(views, device_crops, params, batches, device)

    diff = (device_views.int() - pillow.int()).abs()
    per_view = diff.flatten(1).amax(1)
    cos = []
    for b in batches:
        idx = list(b)
        a = teacher(pillow[idx])
        d = teacher(device_views[idx])
        cos.append(F.cosine_similarity(a, d, dim=-1).flatten())
    cos = torch.cat(cos)
    where = f"{device} ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "cpu"
    body = ("## Device view path: fidelity and cost\n\n"
            f"{len(images)} real ImageNet JPEGs x K = {args.views} views ({len(params)}), default view settings, "
            f"{size} px {interp}; device path on {where}, teacher {args.teacher} (random weights) "
            f"{teacher.precision} on both paths' views of the same parameters.\n\n"
            + table(["measure", "value"], [
                ["views whose pixels differ from the Pillow path", f"{int((per_view > 0).sum())} of {len(params)}"],
                ["max abs pixel difference (levels)", int(diff.max())],
                ["mean abs pixel difference (levels)", float(diff.float().mean())],
                ["teacher latents, min token cosine (goal >= 0.9999)", f"{float(cos.min()):.6f}"],
                ["teacher latents, mean token cosine", f"{float(cos.mean()):.6f}"],
                ["host: decode (Pillow), ms per image", ms_decode],
                ["host: Pillow view (jitter, flip, crop, resize), ms per view", ms_pillow],
                ["host: device path's crop copy, ms per view", ms_crop],
                [f"device path on {device.type}: microseconds per view (batch {args.batch_size})", us_device],
                *[[f"  of which {name} (us per view)", us] for name, us in parts.items()],
            ]))
    publish("device-views", body)


def where_the_time_goes(views, crops, params, batches, device) -> dict[str, float]:
    """`DeviceViews.make`'s steps timed one by one (synchronised): host inputs, padding copies, rendering."""
    from targets.device_views import group_inputs, plan_groups, render_group, to_device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    spent = {"host: plan and group inputs": 0.0, "inputs to the device": 0.0, "crops into padded groups": 0.0,
             "jitter, resize (render_group)": 0.0}
    for b in batches:
        idx = list(b)
        sub = [params[i] for i in idx]
        t = time.perf_counter()
        plans = plan_groups([(p.height, p.width) for p in sub], views.out_hw, views.group_elements)
        inputs = [group_inputs(sub, plan, views.out_hw, views.interpolation) for plan in plans]
        spent["host: plan and group inputs"] += time.perf_counter() - t
        for plan, g in zip(plans, inputs, strict=True):
            t = time.perf_counter()
            vertical = bool(g.pop("vertical_first"))
            g = to_device(g, device)
            sync()
            spent["inputs to the device"] += time.perf_counter() - t
            t = time.perf_counter()
            x = torch.zeros((len(plan.index), plan.hp, plan.wp, 3), dtype=torch.uint8, device=device)
            for j, i in enumerate(plan.index):
                x[j, :sub[i].height, :sub[i].width] = crops[idx[i]]
            sync()
            spent["crops into padded groups"] += time.perf_counter() - t
            t = time.perf_counter()
            render_group(x, g, vertical)
            sync()
            spent["jitter, resize (render_group)"] += time.perf_counter() - t
    return {k: v / len(params) * 1e6 for k, v in spent.items()}


if __name__ == "__main__":
    main()
