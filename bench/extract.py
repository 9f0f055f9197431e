"""Stage 1 efficiency and storage: extract-targets views/s vs the teacher's forward alone on in-memory
batches (same teacher, batch and precision), and bytes on disk per view vs the raw (1 + T) x D x 2;
then the teacher's own speed in TFLOP/s per precision mode (and compiled), with its latents' cosine
against the default mode's on the same real views.

    python -m bench.extract [--images 96] [--views 2] [--teacher ViT-B-16] [--view-path auto]
        [--teacher-modes fp16,fp16-weights,fp16-weights+compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._common import make_sample_shards, publish, rate, table
from bench.speedup import flops_per_sample
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.shards import iter_shard, required_image_bytes
from targets.store import TargetStore
from targets.teacher import Teacher, TeacherSpec
from targets.views import ViewParams, apply_view, decode_image


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=1, help="Use each image this many times (under other keys).")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--view-path", default="auto")
    ap.add_argument("--decoder", choices=("host", "device"), default="host")
    ap.add_argument("--teacher-modes", default=None,
                    help="Comma-separated precision modes to time ('+compile' compiles the tower); default: "
                         "fp16,fp16-weights,fp16-weights+compile on a GPU, none on CPU.")
    return ap.parse_args()


def main() -> None:
    args = parse()
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
                                      batch_size=args.batch_size, workers=args.workers, progress=False,
                                      view_path=args.view_path, decoder=args.decoder))
    view_path = TargetStore.open(store).meta.view_path
    end_to_end = stats.views / stats.seconds
    forward = (before + forward_only()) / 2  # measured before and after: slow drifts of the machine cancel
    meta = TargetStore.open(store).meta
    raw = meta.num_tokens * meta.latent_dim * 2
    on_disk = du(store / "units")
    body = ("## Stage 1 efficiency and storage\n\n"
            f"Teacher {args.teacher} (random weights; speed only) on {device}, {teacher.precision}, batch "
            f"{args.batch_size}; {args.images} real ImageNet JPEGs{f' x {args.repeat}' if args.repeat > 1 else ''} "
            f"x K = {args.views}; {args.workers} decode worker(s); views cut on the {view_path} view path from "
            f"{meta.decoder}-decoded images.\n\n"
            + table(["measure", "value"], [
                ["teacher forward only, in-memory uint8 batches (views/s; mean of before and after)", forward],
                ["extract-targets end to end (views/s)", end_to_end],
                ["**efficiency** (end to end / forward only; goal >= 0.9)", end_to_end / forward],
                ["raw latents per view, (1 + T) x D x 2 (bytes)", raw],
                ["on disk per view, everything under units/ (bytes)", on_disk / stats.views],
                ["**storage overhead** (on disk / raw)", on_disk / stats.views / raw],
            ]))
    modes = args.teacher_modes or ("fp16,fp16-weights,fp16-weights+compile" if device == "cuda" else "")
    if modes:
        body += "\n\n" + teacher_modes(spec, device, [str(m) for m in modes.split(",")], store, args.batch_size)
    publish("extract", body)


def teacher_modes(spec, device: str, modes: list[str], store: Path, batch_size: int) -> str:
    """The teacher's forward per mode: views/s and TFLOP/s on in-memory batches, and the cosine of its
    latents to the first mode's on real views (the store's first unit, re-cut by the Pillow path)."""
    ts = TargetStore.open(store)
    name = ts.unit_names()[0]
    unit = ts.unit(name)
    url = str(ts.group[f"units/{name}"].attrs["source"])
    real = []
    for row, sample in enumerate(iter_shard(url)):
        if unit.valid[row] and len(real) < batch_size:
            img = decode_image(required_image_bytes(sample))
            real += [apply_view(img, ViewParams.from_record(unit.view_int[row, k], unit.view_float[row, k]),
                                ts.meta.input_size, ts.meta.interpolation) for k in range(unit.view_int.shape[1])]
    real = torch.stack(real[:batch_size])
    _, flops = flops_per_sample("cae2_vit_base", spec.name)
    synthetic = torch.randint(0, 256, (batch_size, 3, ts.meta.input_size, ts.meta.input_size), dtype=torch.uint8)
    rows, reference = [], None
    for mode in modes:
        precision, _, compiled = mode.partition("+")
        t0 = time.perf_counter()
        teacher = Teacher(spec, device=device, precision=precision, compile=bool(compiled))
        out = teacher(real)  # compiles here when asked
        setup = time.perf_counter() - t0
        views_per_s = rate(lambda t=teacher: t(synthetic), 10, batch_size)
        reference = out if reference is None else reference
        cos = F.cosine_similarity(out, reference, dim=-1)
        rows.append([mode, views_per_s, views_per_s * flops / 1e12, f"{float(cos.min()):.6f}",
                     f"{float(cos.mean()):.6f}", setup])
        del teacher
    return ("Teacher forward alone per mode (batch " f"{batch_size}, in-memory uint8 views; cosine against "
            f"{modes[0]} on {len(real)} real views):\n\n"
            + table(["mode", "views/s", "TFLOP/s", "min token cosine", "mean token cosine", "load + compile (s)"],
                    rows))


if __name__ == "__main__":
    main()
