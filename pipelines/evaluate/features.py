"""Frozen features of a labelled image set under the evaluation transform, cached on request."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipelines.evaluate.data import CenterCropImages, eval_resize
from pipelines.files import save_torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(model, data, pool: str = "cls", batch_size: int = 128, workers: int = 0,
                     cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on the CPU, labels [N]) of a LabelledImages set under the evaluation
    transform. With `cache_dir`, they are saved once per (model weights, data files and labels, transform,
    pool)."""
    settings = {"model_sha256": model.sha256, "data": data.identity, "images": len(data), "pool": pool,
                "transform": f"resize {eval_resize(model.img_size)} bicubic, center crop {model.img_size}",
                "mean": list(model.mean), "std": list(model.std)}
    cache = None
    if cache_dir:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        cache = Path(cache_dir) / f"features-{digest}.pt"
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            if saved.get("settings") == settings:
                logger.info(f"features: {cache} (cached)")
                return saved["features"], saved["labels"]
    loader = DataLoader(CenterCropImages(data, model.img_size), batch_size=batch_size, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), pin_memory=model.device.type == "cuda")
    feats, labels = torch.empty(0), torch.as_tensor(data.labels)
    for images, _, index in loader:
        f = model.features(images, pool).cpu()
        if not len(feats):
            feats = torch.empty((len(data), f.shape[1]), dtype=torch.float32)
        feats[index] = f
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_torch({"features": feats, "labels": labels, "settings": settings}, tmp)
        tmp.replace(cache)
    return feats, labels
