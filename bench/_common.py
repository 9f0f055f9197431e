"""Shared helpers of the benchmark scripts: machine description, tables, docs/benchmarks.md sections,
and fixtures built from the real ImageNet sample."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import time
from pathlib import Path

import numpy as np
import PIL
import psutil
import torch
import zarr

from cae2.masking import create_mask_generator
from pipelines.shards import expand_shards, image_crc, iter_shard, make_shards, required_image_bytes
from targets.store import TargetStore
from targets.store_meta import StoreMeta
from targets.views import ViewSettings, decode_image, measure_view, sample_view

ROOT = Path(__file__).resolve().parent.parent
DOC = Path(os.environ.get("CAE2_BENCH_DOC", ROOT / "docs" / "benchmarks.md"))  # dry runs write elsewhere
SAMPLE = Path(os.environ.get("CAE2_BENCH_IMAGES", ROOT.parent / "shared" / "data" / "imagenet-sample"))


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"Pillow {PIL.__version__}, zarr {zarr.__version__}, numpy {np.__version__}")


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(section: str, body: str) -> None:
    """Print a section and write it between its markers in docs/benchmarks.md. On a machine with a GPU
    the section is a separate one (`<section>-gpu`, the GPU named in its heading): CPU figures stay."""
    if torch.cuda.is_available():
        section += "-gpu"
        heading, _, rest = body.strip().partition("\n")
        body = f"{heading} ({torch.cuda.get_device_name(0)})\n{rest}"
    stamp = time.strftime("%Y-%m-%d")
    block = (f"<!-- bench:{section} -->\n{body.strip()}\n\n_Measured {stamp} on: {machine()}._\n"
             f"<!-- /bench:{section} -->")
    print(block)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{section} -->.*?<!-- /bench:{section} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def rate(fn, calls: int, items_per_call: int) -> float:
    """Items/s of `calls` calls of fn (after one warm-up call), synchronising CUDA around the timing."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return calls * items_per_call / (time.perf_counter() - t0)


def synthetic_masks(model_cfg, n: int):
    """n block masks of a student ([n, N] bool tensor), as the data loader makes them."""
    gen = create_mask_generator(model_cfg)
    return torch.from_numpy(np.stack([gen(np.random.default_rng(i)) for i in range(n)]))


def sample_images(n: int | None = None) -> list[Path]:
    if not SAMPLE.is_dir():
        raise SystemExit(f"benchmark images not found at {SAMPLE}; set CAE2_BENCH_IMAGES to a folder of JPEGs")
    files = sorted(p for p in SAMPLE.iterdir() if p.is_file())
    return files[:n] if n else files


def make_sample_shards(work: Path, n: int | None = None, per_shard: int = 50, repeat: int = 1) -> Path:
    """Shards of the real ImageNet sample (optionally repeated to make a larger data set)."""
    src = work / "images"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for r in range(repeat):
        for p in sample_images(n):
            os.symlink(p, src / f"r{r}_{p.name}")
    out = work / "shards"
    if out.exists():
        shutil.rmtree(out)
    make_shards(src, out, samples_per_shard=per_shard)
    return out


def fake_store(shards: Path, out: Path, k: int = 1, tokens: int = 197, dim: int = 512, seed: int = 0) -> Path:
    """A valid target store with real view parameters and random latents of CLIP ViT-B/16's shape
    (for pipeline benchmarks that need the store's layout and sizes, not the teacher's values)."""
    settings = ViewSettings()
    meta = StoreMeta(teacher={"name": "benchmark-random-latents", "random_init": True}, views=settings.to_dict(),
                     seed=seed, views_per_image=k, input_size=224, grid=(14, 14), num_tokens=tokens, latent_dim=dim,
                     mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                     interpolation="bicubic")
    if out.exists():
        shutil.rmtree(out)
    store = TargetStore.create_or_validate(str(out), meta)
    rng = np.random.default_rng(seed)
    for shard in expand_shards(str(shards)):
        samples = list(iter_shard(shard.url))
        writer = store.begin_unit(shard.name, shard.url, [s["__key__"] for s in samples],
                                  image_crc=[image_crc(s) for s in samples])
        lat = rng.standard_normal((len(samples), k, tokens, dim)).astype(np.float16)
        for row, s in enumerate(samples):
            img = decode_image(required_image_bytes(s))
            hw = (img.height, img.width)
            for v in range(k):
                p = measure_view(sample_view(settings, seed, s["__key__"], v, hw), img)
                writer.view_int[row, v], writer.view_float[row, v] = p.to_record()
            writer.image_hw[row], writer.valid[row] = hw, True
        for start in range(0, len(samples), meta.images_per_shard):
            writer.write_rows(start, lat[start:start + meta.images_per_shard])
        writer.finish(shard.url)
    return out


class PeakRSS:
    """Peak memory of a process tree (the process and its data-loader workers), sampled, as PSS: pages
    shared between the forked workers and their parent are counted once, not once per process."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0

    def sample(self) -> None:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total)
        except psutil.Error:
            pass
