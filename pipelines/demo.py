"""`cae2 demo`: the whole pipeline on a small embedded default, offline, in a few minutes on 2 CPUs.

    synthetic images -> make-shards -> extract-targets -> verify-targets -> pretrain -> export

The teacher is the bundled `cae2-tiny-clip` tower with RANDOM weights (no CLIP weights can be
downloaded here), and the student is `cae2_debug`: the run shows the machinery working end to end,
not a useful model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from accelerate.utils import set_seed
from PIL import Image

import cae2
from cae2.errors import UserError
from cae2.fields import PathKind, Range
from pipelines.evaluate.alignment import alignment_cosine
from pipelines.evaluate.data import load_labelled
from pipelines.evaluate.features import extract_features
from pipelines.evaluate.knn import knn_classify, student_knn
from pipelines.evaluate.models import load_feature_model
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.extract.verify import verify_store
from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.export import export_encoder, load_model
from pipelines.pretrain.loop import train
from pipelines.shards import make_shards
from targets.store import TargetStore
from targets.teacher import TeacherSpec


def say(text: str) -> None:
    """The demo's report, on stdout (the stages' own log lines go to stderr)."""
    print(text, flush=True)


@dataclass(kw_only=True)
class DemoConfig:
    """Every option of `cae2 demo`."""

    out: Annotated[Path, PathKind("out_dir")] = Path("demo")
    """Directory for every output of the demo."""
    steps: Annotated[int, Range(min=1)] = 60
    """Pretraining steps."""


def synthetic_image(rng: np.random.Generator, h: int, w: int, label: int | None = None) -> np.ndarray:
    """A smooth random 'photo' [h, w, 3] uint8 with structure at several scales. With a `label`, the
    image's stripe scale and orientation and its tint depend on it (classes a good encoder separates)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for c in range(3):
        if label is None:
            fx, fy = rng.uniform(3, 25, 2)
        else:  # class-specific scale (wide apart) and orientation, random phase
            scale = (3, 7, 14, 28)[label % 4] * rng.uniform(0.85, 1.15)
            fx, fy = (scale, scale * 4) if (label // 4) % 2 == 0 else (scale * 4, scale)
        channels.append(np.sin(x / fx + rng.uniform(0, 6)) + np.cos(y / fy + rng.uniform(0, 6)))
        if label is not None:
            channels[-1] += 0.8 * np.cos(2 * np.pi * (label / 8 + c / 3))
    img = np.stack(channels, -1) + rng.normal(0, 0.25, (h, w, 3))
    return ((img + 2.5) / 5 * 255).clip(0, 255).astype(np.uint8)


def write_demo_images(folder: Path, n_classes: int = 4, per_class: int = 40, seed: int = 0) -> int:
    """Class sub-folders of JPEGs of varied sizes whose look depends on the class (so labels, odd aspect
    ratios and the k-NN evaluation are exercised)."""
    rng = np.random.default_rng(seed)
    sizes = [(96, 128), (128, 96), (80, 80), (150, 200), (64, 100)]
    count = 0
    for c in range(n_classes):
        d = folder / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[(c + i) % len(sizes)]
            Image.fromarray(synthetic_image(rng, h, w, label=c)).save(d / f"img_{i:03d}.jpg", quality=90)
            count += 1
    return count


@dataclass(frozen=True)
class DemoPaths:
    """Where every output of the demo goes, under one folder."""

    images: Path
    shards: Path
    store: Path
    run: Path
    heldout_images: Path
    heldout_shards: Path
    heldout_store: Path
    labelled: Path
    encoder: Path

    @classmethod
    def under(cls, out: Path) -> DemoPaths:
        return cls(images=out / "images", shards=out / "shards", store=out / "targets.zarr", run=out / "run",
                   heldout_images=out / "heldout_images", heldout_shards=out / "heldout_shards",
                   heldout_store=out / "heldout.zarr", labelled=out / "labelled", encoder=out / "encoder.safetensors")


TEACHER = TeacherSpec(name="cae2-tiny-clip", pretrained="none")


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise UserError(f"--out {cfg.out} is not empty; remove it or choose another directory")
    d = DemoPaths.under(cfg.out)
    say("NOTE: no CLIP weights can be downloaded here, so the demo teacher is the bundled cae2-tiny-clip tower with "
        "RANDOMLY INITIALISED weights (--pretrained none). Real runs use --teacher ViT-B-16 --pretrained openai.")
    _images_and_shards(d)
    _targets(d)
    records = _pretrain(d, cfg.steps)
    result = _measure(d) | {"loss_first": records[0]["loss"], "loss_last": records[-1]["loss"]}
    say(f"[6/6] cae2 export {d.run} --out {d.encoder}")
    _, call = export_encoder(d.run, d.encoder)
    say("      " + call.replace("\n", "\n      "))
    say(f"\ndone in {time.perf_counter() - t0:.0f}s. Outputs:\n"
        f"  images          {d.images}\n  shards          {d.shards}\n  target store    {d.store}\n"
        f"  run dir         {d.run} (metrics.jsonl, tensorboard/ with pictures, checkpoints/)\n"
        f"  encoder         {d.encoder}\n"
        f"Look at them: cae2 inspect {d.store} --shards {d.shards} --report {cfg.out / 'report'}   (status, "
        f"report.html)\n              cae2 inspect {d.run}   (summary; --report DIR draws the curves)\n"
        f"              tensorboard --logdir {d.run / 'tensorboard'}")
    return result


def _images_and_shards(d: DemoPaths) -> None:
    say(f"\n[1/6] demo images -> {d.images}")
    n = write_demo_images(d.images)
    write_demo_images(d.heldout_images, n_classes=2, per_class=8, seed=123)
    # the k-NN evaluation's own train/val split (classes 0-3, other images)
    write_demo_images(d.labelled / "train", per_class=16, seed=7)
    write_demo_images(d.labelled / "val", per_class=8, seed=8)
    say(f"      {n} training + 16 held-out synthetic JPEGs; k-NN split: 64 train / 32 val in 4 classes")
    say(f"[2/6] cae2 make-shards {d.images} {d.shards} --samples-per-shard 20")
    paths = make_shards(d.images, d.shards, samples_per_shard=20)
    make_shards(d.heldout_images, d.heldout_shards, samples_per_shard=8)
    say(f"      {len(paths)} shards")


def _targets(d: DemoPaths) -> None:
    say(f"[3/6] cae2 extract-targets --shards {d.shards} --out {d.store} --teacher cae2-tiny-clip --pretrained none "
        "--views 4")
    stats = run_extract(ExtractConfig(shards=str(d.shards), out=str(d.store), teacher=TEACHER, views_per_image=4,
                                      workers=2, batch_size=64))
    run_extract(ExtractConfig(shards=str(d.heldout_shards), out=str(d.heldout_store), teacher=TEACHER,
                              views_per_image=1, workers=0, progress=False))
    say("      " + stats.summary(1).replace("\n", "\n      "))
    say(f"[4/6] cae2 verify-targets {d.store} --shards {d.shards} --recompute 8")
    report = verify_store(str(d.store), str(d.shards), recompute=8)
    say("      " + report.summary().replace("\n", "\n      "))
    if not report.ok:
        raise RuntimeError("the demo store failed verification")


def _pretrain(d: DemoPaths, steps: int) -> list[dict]:
    every = max(steps // 3, 1)
    say(f"[5/6] cae2 pretrain --shards {d.shards} --targets {d.store} --model cae2_debug --out {d.run} "
        f"--steps {steps} --batch-size 16 --warmup-steps 5 --lr 2e-3 --image-every {every} --allow-random-teacher")
    train(TrainConfig(shards=str(d.shards), targets=str(d.store), model="cae2_debug", out=str(d.run), steps=steps,
                      batch_size=16, workers=2, warmup_steps=5, lr=2e-3, log_every=5, save_every=max(steps // 2, 1),
                      image_every=every, allow_random_teacher=True))
    records = [r for r in map(json.loads, (d.run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    say(f"      loss {records[0]['loss']:.4f} (step {records[0]['step']}) -> {records[-1]['loss']:.4f} "
        f"(step {records[-1]['step']})")
    return records


def _measure(d: DemoPaths) -> dict:
    """Held-out alignment with the teacher and k-NN, at initialisation and after training."""
    set_seed(0)
    initial = cae2.CAEv2(cae2.resolve_model_config("cae2_debug"))
    held = TargetStore.open(d.heldout_store)
    before = alignment_cosine(initial, held, str(d.heldout_shards))
    after = alignment_cosine(load_model(d.run), held, str(d.heldout_shards))
    say(f"      held-out student/teacher cosine: {before:.3f} at init -> {after:.3f} after training")
    knn = {name: _knn_top1(m, d.labelled) for name, m in (("init", initial), ("trained", load_model(d.run)))}
    teacher_knn = _knn_top1(None, d.labelled)
    say(f"      k-NN top-1 (k = 10, CLS) on the labelled split: {knn['init']:.1f}% at init -> {knn['trained']:.1f}% "
        f"after training (chance 25%; the random teacher: {teacher_knn:.1f}%); cae2 evaluate knn --model {d.run} "
        f"--train {d.labelled / 'train'} --val {d.labelled / 'val'} --out knn.json")
    return {"cos_before": before, "cos_after": after, "knn_before": knn["init"], "knn_after": knn["trained"],
            "knn_teacher": teacher_knn}


def _knn_top1(model, labelled: Path) -> float:
    """k-NN top-1 % (k = 10) of a student's CLS features (None: the demo's teacher) on the labelled split."""
    train = load_labelled(str(labelled / "train"), "train")
    val = load_labelled(str(labelled / "val"), "val", classes=train.classes)
    if model is not None:
        return student_knn(model, train, val, k=10)[0]
    fm = load_feature_model("clip:cae2-tiny-clip:none")
    tf, tl = extract_features(fm, train)
    vf, vl = extract_features(fm, val)
    return knn_classify(tf, tl, vf, vl, len(train.classes), (10,))[10][0]
