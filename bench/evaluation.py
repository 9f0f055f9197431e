"""Feature extraction of `cae2 evaluate` (Resize 256 bicubic + CenterCrop 224, the encoder's forward on
the whole image) in samples/s, for ViT-Tiny and ViT-Base students, on the real ImageNet sample. The
sample has one image per class: it measures speed, not accuracy.

    python -m bench.evaluation [--images 300] [--workers 1] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import cae2
from bench._common import publish, sample_images, table
from cae2.config import IMAGENET_MEAN, IMAGENET_STD
from pipelines.evaluate.data import load_labelled
from pipelines.evaluate.features import extract_features
from pipelines.evaluate.knn import knn_classify
from pipelines.evaluate.models import FeatureModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--presets", default="cae2_vit_tiny,cae2_vit_base")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cae2-bench-eval-"))
    for i, p in enumerate(sample_images(args.images)):  # an ImageFolder tree: one class per image
        folder = work / f"c{i:03d}"
        folder.mkdir()
        (folder / p.name).symlink_to(p)
    data = load_labelled(str(work), "--train")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for preset in args.presets.split(","):
        model = cae2.create_model(preset)
        fm = FeatureModel(model.encoder.eval(), "vit", model.cfg.img_size, IMAGENET_MEAN, IMAGENET_STD, preset,
                          "").to(device)
        extract_features(fm, data, batch_size=args.batch_size, workers=args.workers)  # warm-up
        t0 = time.perf_counter()
        feats, labels = extract_features(fm, data, batch_size=args.batch_size, workers=args.workers)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        knn_classify(feats, labels, feats, labels, len(data.classes), device=device)
        knn_ms = (time.perf_counter() - t0) * 1e3
        rows.append([preset, feats.shape[1], len(data) / seconds, knn_ms])
    body = ("## Evaluation: feature extraction\n\n"
            f"{len(data)} real ImageNet JPEGs (one per class: speed only, no accuracy claim), Resize "
            f"256 bicubic + CenterCrop 224, CLS after the final norm, batch {args.batch_size}, {args.workers} "
            f"decode worker(s), {device}, {torch.get_num_threads()} compute threads; random weights (the speed is "
            "the same). k-NN: all k of {10, 20, 100, 200}, the set against itself.\n\n"
            + table(["encoder", "feature dim", "extraction samples/s", "k-NN (ms)"], rows))
    publish("evaluation", body)


if __name__ == "__main__":
    main()
