"""k-NN classification of frozen features, DINO's weighted voting (facebookresearch/dino eval_knn.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cae2.config import IMAGENET_MEAN, IMAGENET_STD
from pipelines.evaluate.config import KS, TEMPERATURE
from pipelines.evaluate.features import extract_features
from pipelines.evaluate.models import FeatureModel


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_l: torch.Tensor, val_f: torch.Tensor, val_l: torch.Tensor,
                 num_classes: int, ks=KS, temperature: float = TEMPERATURE, chunk: int = 1024,
                 device: str | torch.device = "cpu") -> dict[int, tuple[float, float]]:
    """{k: (top-1 %, top-5 %)}: cosine similarity of L2-normalised features, the k nearest training
    samples vote with weight exp(sim / temperature) (DINO's eval_knn). Validation rows go through in
    chunks on `device`, so ImageNet's 1.28M x 50k never needs the full similarity matrix."""
    device = torch.device(device)
    train = F.normalize(train_f.float(), dim=1).to(device)
    labels = train_l.to(device)
    kmax = min(max(ks), len(train))
    hits = {k: [0, 0] for k in ks}
    for start in range(0, len(val_f), chunk):
        v = F.normalize(val_f[start:start + chunk].float(), dim=1).to(device)
        target = val_l[start:start + chunk].to(device)
        sim, idx = (v @ train.T).topk(kmax, dim=1)  # sorted, largest first
        votes_all = F.one_hot(labels[idx], num_classes).float() * (sim / temperature).exp().unsqueeze(-1)
        for k in ks:
            votes = votes_all[:, :min(k, kmax)].sum(1)
            top = votes.topk(min(5, k, num_classes), dim=1)  # as DINO: the first min(5, k) predictions ...
            correct = (top.indices == target.unsqueeze(1)) & (top.values > 0)  # ... of classes with votes
            hits[k][0] += int(correct[:, 0].sum())
            hits[k][1] += int(correct.any(1).sum())
    n = len(val_f)
    return {k: (100.0 * h1 / n, 100.0 * h5 / n) for k, (h1, h5) in hits.items()}


def student_knn(model, train, val, k: int = 20, device: str | torch.device = "cpu") -> tuple[float, float]:
    """(top-1 %, top-5 %) of a CAEv2 student's CLS features (its encoder, eval mode, restored after)."""
    encoder = model.encoder
    was_training = encoder.training
    fm = FeatureModel(encoder.eval(), "vit", model.cfg.img_size, IMAGENET_MEAN, IMAGENET_STD, "student", "")
    try:
        tf, tl = extract_features(fm, train)
        vf, vl = extract_features(fm, val)
    finally:
        encoder.train(was_training)
    return knn_classify(tf, tl, vf, vl, len(train.classes), (k,), device=device)[k]
