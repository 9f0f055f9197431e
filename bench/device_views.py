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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench._common import publish, sample_images, table
from targets.decoders import decode_on_device, device_decodable, device_decoder_name
from targets.device_views import DeviceViews, Packer, use_kernels
from targets.teacher import Teacher, TeacherSpec
from targets.views import ViewSettings, apply_view, decode_image, measure_view, sample_view


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--views", type=int, default=5, help="K, stage 1's default: the host copies each image once")
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--decoder", choices=("host", "device"), default="host",
                    help="device: the JPEGs are decoded on the device (nvJPEG on a GPU), the rest by Pillow")
    return ap.parse_args()


@dataclass
class Inputs:
    """The sample decoded by Pillow, the files a device decoder takes, and each image's K views' records."""

    images: list
    arrays: list[np.ndarray]
    jpegs: list[torch.Tensor | None]
    sampled: list[list]
    view_int: list[np.ndarray]
    view_float: list[np.ndarray]
    us: dict[str, float]  # host time per image or view of each step the loader workers take


def prepare(args: argparse.Namespace) -> Inputs:
    files = sample_images(args.images)
    t0 = time.perf_counter()
    images = [decode_image(p.read_bytes()) for p in files]
    us = {"decode": (time.perf_counter() - t0) / len(images) * 1e6}
    jpegs: list[torch.Tensor | None] = [None] * len(files)  # --decoder device: the files it takes (headers only)
    datas = [p.read_bytes() for p in files]
    t0 = time.perf_counter()
    if args.decoder == "device":
        jpegs = [torch.frombuffer(bytearray(data), dtype=torch.uint8) if device_decodable(data).host_reason is None
                 else None for data in datas]
    us["header"] = (time.perf_counter() - t0) / len(images) * 1e6
    t0 = time.perf_counter()
    sampled = [[sample_view(ViewSettings(), 0, p.stem, k, (img.height, img.width)) for k in range(args.views)]
               for p, img in zip(files, images, strict=True)]
    us["sample"] = (time.perf_counter() - t0) / (len(images) * args.views) * 1e6
    records = [[v.to_record() for v in views] for views in sampled]  # what the workers hand on, per image
    return Inputs(images, [np.asarray(img) for img in images], jpegs, sampled,
                  [np.stack([r[0] for r in recs]) for recs in records], [np.stack([r[1] for r in recs]) for recs in
                                                                          records], us)


def pillow_views(inputs: Inputs, teacher: Teacher) -> tuple[torch.Tensor, float]:
    """The same views on the Pillow path -> (views, ms per view)."""
    params = [measure_view(v, img) for vs, img in zip(inputs.sampled, inputs.images, strict=True) for v in vs]
    owner = [i for i, vs in enumerate(inputs.sampled) for _ in vs]
    t0 = time.perf_counter()
    pillow = torch.stack([apply_view(inputs.images[i], p, teacher.image_size, teacher.interpolation)
                          for i, p in zip(owner, params, strict=True)])
    return pillow, (time.perf_counter() - t0) / len(owner) * 1e3


def main() -> None:
    args = parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = prepare(args)
    teacher = Teacher(TeacherSpec(name=args.teacher, pretrained="none"), device=device)
    views = DeviceViews(teacher.image_size, teacher.interpolation, device)
    per_image = args.batch_size // args.views
    n = len(inputs.images)
    batches = [range(s, min(s + per_image, n)) for s in range(0, n, per_image)]
    packer = Packer(device)  # its host buffers are allocated once, as in a run: warm every one of them up
    sources = [j if j is not None else a for j, a in zip(inputs.jpegs, inputs.arrays, strict=True)]
    for _ in range(-(-len(packer.buffers) // len(batches))):
        run(views, packer, sources, inputs.view_int, inputs.view_float, batches, device)
    out, spent = run(views, packer, sources, inputs.view_int, inputs.view_float, batches, device)
    pillow, ms_pillow = pillow_views(inputs, teacher)
    diff = (out.int() - pillow.int()).abs()
    cos = torch.cat([F.cosine_similarity(teacher(pillow[s:s + 256]), teacher(out[s:s + 256]), dim=-1).flatten()
                     for s in range(0, len(out), 256)])
    publish("device-views" if args.decoder == "host" else "device-decode",
            report(args, inputs, teacher, device, diff, cos, ms_pillow, spent))


def report(args: argparse.Namespace, inputs: Inputs, teacher: Teacher, device: torch.device, diff: torch.Tensor,
           cos: torch.Tensor, ms_pillow: float, spent: dict[str, float]) -> str:
    n_views = len(diff)
    renderer = "Triton kernels" if use_kernels(device) else "the plain-torch renderer"
    where = f"{device} ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else "cpu"
    decoded = f"{sum(j is not None for j in inputs.jpegs)} decoded on the device ({device_decoder_name(device)}), " \
        "the rest by Pillow" if args.decoder == "device" else "decoded by Pillow"
    return (f"## Device view path: fidelity and cost (--decoder {args.decoder})\n\n"
            f"{len(inputs.images)} real ImageNet JPEGs ({decoded}) x K = {args.views} views ({n_views}), default "
            f"view settings, {teacher.image_size} px {teacher.interpolation}; device path on {where} with "
            f"{renderer}, batches of {args.batch_size} views; teacher {args.teacher} (random weights) "
            f"{teacher.precision} on both paths' views of the same parameters.\n\n"
            + table(["measure", "value"], [
                ["views whose pixels differ from the Pillow path", f"{int((diff.flatten(1).amax(1) > 0).sum())} of "
                                                                    f"{n_views}"],
                ["max abs pixel difference (levels)", int(diff.max())],
                ["teacher latents, min token cosine (goal >= 0.9999)", f"{float(cos.min()):.6f}"],
                ["host: decode (Pillow), ms per image", inputs.us["decode"] / 1e3],
                ["host: Pillow view (jitter, flip, crop, resize), ms per view", ms_pillow],
                ["host, loader workers: view parameters (sample_view), us per view", inputs.us["sample"]],
                *([["host, loader workers: JPEG header and bytes to a tensor, us per image", inputs.us["header"]]]
                  if args.decoder == "device" else []),
                ["host, main process, besides decoding: us per view (goal <= 5)", spent[HOST]],
                *[[f"  {name} (us per view)", us] for name, us in spent.items()],
            ]))


HOST = "host: pack images, stack records, plan, launch"
DECODE = "device: decode JPEGs (batched), join them with the host images"


def run(views, packer, sources, view_int, view_float, batches, device) -> tuple[torch.Tensor, dict[str, float]]:
    """Every batch through the device path, each step timed (synchronised) -> (views, us per view by step).
    A source is a decoded image (uint8 [H, W, 3]) or a JPEG file (uint8 [bytes]) for the device decoder."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    spent = dict.fromkeys((HOST, DECODE, "images and records to the device", "device: contrast means",
                           "device: tables, coefficients, render"), 0.0)
    outs, n = [], 0
    for b in batches:
        t = time.perf_counter()
        images = [sources[i] for i in b]
        files = [im for im in images if im.ndim == 1]
        if files:
            spent[HOST] += time.perf_counter() - t
            t = time.perf_counter()
            decoded = iter(decode_on_device(files, device))
            images = [next(decoded) if im.ndim == 1 else im for im in images]
        packed = packer.to_device(images)  # the copy to a GPU is queued, not waited for
        if files:  # on CPU tensors, the "device" is the host: the join is a host copy, counted here
            sync()
            spent[DECODE] += time.perf_counter() - t
            t = time.perf_counter()
        ints = torch.from_numpy(np.concatenate([view_int[i] for i in b]))
        floats = torch.from_numpy(np.concatenate([view_float[i] for i in b]))
        owner = torch.from_numpy(np.repeat(np.arange(len(b)), [len(view_int[i]) for i in b]))
        plan = views.plan(packed, owner, ints, floats)
        spent[HOST] += time.perf_counter() - t
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
