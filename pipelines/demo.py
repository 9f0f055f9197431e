"""`cae2 demo`: the whole pipeline on a small embedded default, offline, in a few minutes on 2 CPUs.

    synthetic images -> make-shards -> extract-targets -> verify-targets -> pretrain -> export

The teacher is the bundled `cae2-tiny-clip` tower with RANDOM weights (no CLIP weights can be
downloaded here), and the student is `cae2_debug`: the run shows the machinery working end to end,
not a useful model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from targets.teacher import TeacherSpec


def synthetic_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random 'photo' [h, w, 3] uint8 with structure at several scales."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(3, 25, 2)
        channels.append(np.sin(x / fx + rng.uniform(0, 6)) + np.cos(y / fy + rng.uniform(0, 6)))
    img = np.stack(channels, -1) + rng.normal(0, 0.25, (h, w, 3))
    return ((img + 2.5) / 5 * 255).clip(0, 255).astype(np.uint8)


def write_demo_images(folder: Path, n_classes: int = 4, per_class: int = 40, seed: int = 0) -> int:
    """Class sub-folders of JPEGs of varied sizes (so labels and odd aspect ratios are exercised)."""
    rng = np.random.default_rng(seed)
    sizes = [(96, 128), (128, 96), (80, 80), (150, 200), (64, 100)]
    count = 0
    for c in range(n_classes):
        d = folder / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[(c + i) % len(sizes)]
            Image.fromarray(synthetic_image(rng, h, w)).save(d / f"img_{i:03d}.jpg", quality=90)
            count += 1
    return count


def run_demo(out: Path, steps: int = 60, echo=print) -> dict:
    from pipelines.evaluate import alignment_cosine
    from pipelines.export import export_encoder, load_model
    from pipelines.extract import ExtractConfig, format_summary, run_extract
    from pipelines.shards import make_shards
    from pipelines.train import TrainConfig, train
    from pipelines.verify import verify_store
    from targets.cache import TargetStore

    t0 = time.perf_counter()
    if out.exists() and any(out.iterdir()):
        from cae2.errors import UserError

        raise UserError(f"--out {out} is not empty; remove it or choose another directory")
    images, shards, store, run = out / "images", out / "shards", out / "targets.zarr", out / "run"
    heldout_images, heldout_shards, heldout_store = out / "heldout_images", out / "heldout_shards", out / "heldout.zarr"
    echo("NOTE: no CLIP weights can be downloaded here, so the demo teacher is the bundled cae2-tiny-clip tower with "
         "RANDOMLY INITIALISED weights (--pretrained none). Real runs use --teacher ViT-B-16 --pretrained openai.")

    echo(f"\n[1/6] demo images -> {images}")
    n = write_demo_images(images)
    write_demo_images(heldout_images, n_classes=2, per_class=8, seed=123)
    echo(f"      {n} training + 16 held-out synthetic JPEGs")

    echo(f"[2/6] cae2 make-shards {images} {shards} --samples-per-shard 20")
    paths = make_shards(images, shards, samples_per_shard=20)
    make_shards(heldout_images, heldout_shards, samples_per_shard=8)
    echo(f"      {len(paths)} shards")

    teacher = TeacherSpec(name="cae2-tiny-clip", pretrained="none")
    echo(f"[3/6] cae2 extract-targets --shards {shards} --out {store} --teacher cae2-tiny-clip --pretrained none "
         "--views 4")
    stats = run_extract(ExtractConfig(shards=str(shards), out=str(store), teacher=teacher, views_per_image=4,
                                      workers=2, batch_size=64), log=lambda m: None)
    run_extract(ExtractConfig(shards=str(heldout_shards), out=str(heldout_store), teacher=teacher, views_per_image=1,
                              workers=0, progress=False), log=lambda m: None)
    echo("      " + format_summary(stats, 1).replace("\n", "\n      "))

    echo(f"[4/6] cae2 verify-targets {store} --shards {shards} --recompute 8")
    report = verify_store(str(store), str(shards), recompute=8)
    echo("      " + report.summary().replace("\n", "\n      "))
    if not report.ok:
        raise RuntimeError("the demo store failed verification")

    echo(f"[5/6] cae2 pretrain --shards {shards} --targets {store} --model cae2_debug --out {run} --steps {steps} "
         "--batch-size 16 --warmup-steps 5 --lr 2e-3 --allow-random-teacher")
    train(TrainConfig(shards=str(shards), targets=str(store), model="cae2_debug", out=str(run), steps=steps,
                      batch_size=16, workers=2, warmup_steps=5, lr=2e-3, log_every=5, save_every=max(steps // 2, 1),
                      allow_random_teacher=True), log=lambda m: echo("      " + m))
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    echo(f"      loss {records[0]['loss']:.4f} (step {records[0]['step']}) -> {records[-1]['loss']:.4f} "
         f"(step {records[-1]['step']})")

    from accelerate.utils import set_seed

    import cae2

    set_seed(0)
    initial = cae2.CAEv2(cae2.resolve_model_config("cae2_debug"))
    held = TargetStore.open(heldout_store)
    before = alignment_cosine(initial, held, str(heldout_shards))
    after = alignment_cosine(load_model(run), held, str(heldout_shards))
    echo(f"      held-out student/teacher cosine: {before:.3f} at init -> {after:.3f} after training")

    encoder = out / "encoder.safetensors"
    echo(f"[6/6] cae2 export {run} --out {encoder}")
    _, call = export_encoder(run, encoder)
    echo("      " + call.replace("\n", "\n      "))

    echo(f"\ndone in {time.perf_counter() - t0:.0f}s. Outputs:\n"
         f"  images          {images}\n  shards          {shards}\n  target store    {store}\n"
         f"  run dir         {run} (metrics.jsonl, tensorboard/, checkpoints/)\n  encoder         {encoder}")
    return {"loss_first": records[0]["loss"], "loss_last": records[-1]["loss"], "cos_before": before,
            "cos_after": after}
