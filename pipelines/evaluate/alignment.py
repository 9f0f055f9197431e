"""How close a student is to its teacher: the mean cosine of its predictions to the cached targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import cae2
from cae2.config import IMAGENET_MEAN, IMAGENET_STD
from pipelines.shards import expand_shards, iter_shard, required_image_bytes
from targets.store import TargetStore
from targets.views import ViewParams, apply_view, decode_image, normalize


@torch.no_grad()
def alignment_cosine(model: cae2.CAEv2, store: TargetStore, shards: str, limit: int = 256) -> float:
    """Mean cosine between head(encoder(all patches)) and the cached teacher tokens (CLS + patches)."""
    model.eval()
    size = model.cfg.img_size
    total, count = 0.0, 0
    for shard in expand_shards(shards):
        unit = store.unit(shard.name)
        for row, sample in enumerate(iter_shard(shard.url)):
            if not unit.valid[row]:
                continue
            p = ViewParams.from_record(unit.view_int[row, 0], unit.view_float[row, 0])
            image = normalize(apply_view(decode_image(required_image_bytes(sample)), p, size, "bicubic"), IMAGENET_MEAN,
                              IMAGENET_STD)
            visible = torch.zeros(1, model.cfg.num_patches, dtype=torch.bool)
            pred = model.project(model.encoder_to_regressor(model.encode_visible(image[None], visible)))[0]
            target = torch.from_numpy(unit.read(row, 0)).float()
            total += F.cosine_similarity(pred, target, dim=-1).mean().item()
            count += 1
            if count >= limit:
                return total / count
    return total / max(count, 1)
