"""Measures of an encoder: alignment with its teacher on held-out images, k-NN classification (DINO's
weighted voting) and a logistic-regression probe on frozen features."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cae2
from cae2.config import IMAGENET_MEAN, IMAGENET_STD
from cae2.errors import UserError
from pipelines.shards import expand_shards, image_bytes, iter_shard
from targets.cache import TargetStore
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
            image = normalize(apply_view(decode_image(image_bytes(sample)), p, size, "bicubic"), IMAGENET_MEAN,
                              IMAGENET_STD)
            visible = torch.zeros(1, model.cfg.num_patches, dtype=torch.bool)
            pred = model.project(model.encoder_to_regressor(model.encode_visible(image[None], visible)))[0]
            target = torch.from_numpy(unit.read(row, 0)).float()
            total += F.cosine_similarity(pred, target, dim=-1).mean().item()
            count += 1
            if count >= limit:
                return total / count
    return total / max(count, 1)


# --- feature extraction ----------------------------------------------------------------------------

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


@torch.no_grad()
def extract_features(model, data, pool: str = "cls", batch_size: int = 128, workers: int = 0,
                     cache_dir: str | None = None, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] float32 on the CPU, labels [N]) of a LabelledImages set under the evaluation
    transform. With `cache_dir`, they are saved once per (model weights, data, transform, pool)."""
    import hashlib
    from pathlib import Path

    from torch.utils.data import DataLoader

    from pipelines.eval_data import CenterCropImages, eval_resize

    settings = {"model_sha256": model.sha256, "data": str(data.spec), "images": len(data), "pool": pool,
                "transform": f"resize {eval_resize(model.img_size)} bicubic, center crop {model.img_size}",
                "mean": list(model.mean), "std": list(model.std)}
    cache = None
    if cache_dir:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        cache = Path(cache_dir) / f"features-{digest}.pt"
        if cache.is_file():
            saved = torch.load(cache, weights_only=True)
            if saved.get("settings") == settings:
                log(f"features: {cache} (cached)")
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
        torch.save({"features": feats, "labels": labels, "settings": settings}, tmp)
        tmp.replace(cache)
    return feats, labels


def student_knn(model, train, val, k: int = 20, device: str | torch.device = "cpu") -> tuple[float, float]:
    """(top-1 %, top-5 %) of a CAEv2 student's CLS features (its encoder, eval mode, restored after)."""
    from pipelines.eval_models import FeatureModel

    encoder = model.encoder
    was_training = encoder.training
    fm = FeatureModel(encoder.eval(), "vit", model.cfg.img_size, IMAGENET_MEAN, IMAGENET_STD, "student", "")
    try:
        tf, tl = extract_features(fm, train, log=lambda m: None)
        vf, vl = extract_features(fm, val, log=lambda m: None)
    finally:
        encoder.train(was_training)
    return knn_classify(tf, tl, vf, vl, len(train.classes), (k,), device=device)[k]


# --- k-NN (DINO's weighted voting) -------------------------------------------------------------------

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


# --- linear probe on cached features (logistic regression, L2 chosen on held-out training data) ------

L2_SWEEP = tuple(float(x) for x in torch.logspace(-6, 1, 8))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, iters: int) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top == y.unsqueeze(1)
    return 100.0 * correct[:, 0].float().mean().item(), 100.0 * correct.any(1).float().mean().item()


def logistic_probe(train_f, train_l, val_f, val_l, num_classes: int, l2_sweep=L2_SWEEP, holdout: float = 0.1,
                   iters: int = 200, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Standardised features, multinomial logistic regression (L-BFGS, full batch); the L2 strength with
    the best top-1 on a held-out `holdout` of the training split is refitted on all of it."""
    device = torch.device(device)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xt, xv = ((train_f - mean) / std).to(device), ((val_f - mean) / std).to(device)
    yt, yv = train_l.to(device), val_l.to(device)
    perm = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed)).to(device)
    n_hold = max(1, int(len(xt) * holdout))
    hold, fit = perm[:n_hold], perm[n_hold:]
    sweep = {}
    for l2 in l2_sweep:
        head = _fit_logistic(xt[fit], yt[fit], num_classes, l2, iters)
        with torch.no_grad():
            sweep[l2] = _accuracy(head(xt[hold]), yt[hold])[0]
    best = max(sweep, key=lambda k: (sweep[k], -k))
    head = _fit_logistic(xt, yt, num_classes, best, iters)
    with torch.no_grad():
        top1, top5 = _accuracy(head(xv), yv)
    return {"top1": top1, "top5": top5, "l2": best, "holdout_top1_by_l2": {f"{k:.0e}": v for k, v in sweep.items()},
            "holdout_fraction": holdout, "iterations": iters}


# --- the commands --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class KnnConfig:
    """Every option of `cae2 evaluate knn`."""

    model: str
    """A run or checkpoint dir, an exported .safetensors, timm:NAME[:random], or clip:MODEL:WEIGHTS."""
    train: str
    """Labelled training images: an ImageFolder tree (<class>/<image>) or WebDataset shards with cls."""
    val: str
    """Labelled validation images (the training split's classes)."""
    out: str
    """Result JSON (every number and setting); TensorBoard scalars go beside it."""
    pool: str = "cls"
    """Feature: cls (CLS after the final norm; CAE v2 aligns it to CLIP's), avg (mean of patch tokens), cls+avg."""
    ks: str = ",".join(map(str, KS))
    """Numbers of neighbours, comma-separated."""
    temperature: float = TEMPERATURE
    """Voting weights exp(similarity / temperature)."""
    batch_size: int = 128
    """Images per forward."""
    workers: int = 4
    """Data-loader worker processes (decoding)."""
    cache_dir: str | None = None
    """Save the features here, once per model, data, transform and pool, and reuse them."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""


@dataclass(kw_only=True)
class LinearConfig:
    """Every option of `cae2 evaluate linear`."""

    model: str
    """A run or checkpoint dir, an exported .safetensors, timm:NAME[:random], or clip:MODEL:WEIGHTS."""
    train: str
    """Labelled training images: an ImageFolder tree (<class>/<image>) or WebDataset shards with cls."""
    val: str
    """Labelled validation images (the training split's classes)."""
    out: str
    """Result JSON (every number and setting); TensorBoard scalars go beside it."""
    protocol: str = "features"
    """features: logistic regression on frozen features, L2 chosen on held-out training data (fast;
    not comparable with the paper); official: the paper's probe (LARS, 90 epochs, augmentation; under
    accelerate launch, resumable)."""
    pool: str = "cls"
    """features protocol: cls, avg or cls+avg (the official protocol uses cls)."""
    batch_size: int = 128
    """Images per forward (official: per process and micro-batch)."""
    workers: int = 4
    """Data-loader worker processes (decoding)."""
    cache_dir: str | None = None
    """features protocol: save the features here and reuse them."""
    device: str = "auto"
    """features protocol: auto (cuda when available), cuda or cpu."""
    epochs: int = 90
    """official: epochs."""
    warmup_epochs: float = 10
    """official: linear warmup epochs."""
    blr: float = 0.1
    """official: base lr; lr = blr x global batch / 256."""
    global_batch: int = 16384
    """official: images per optimizer step, by accumulation (the paper: 16,384 Tiny, 8,192 Small/Base)."""
    seed: int = 0
    """official: seed of the head's initialisation, the data order and the crops."""
    run_dir: str | None = None
    """official: checkpoints and TensorBoard (default: OUT without .json, plus -run)."""
    save_every: int = 100
    """official: steps between checkpoints (also at the end)."""
    keep_last: int = 2
    """official: complete checkpoints to keep."""
    resume: str | None = None
    """official: 'latest' or a checkpoint path."""
    log_every: int = 10
    """official: steps between TensorBoard scalars."""
    mixed_precision: str | None = None
    """official: no, fp16 or bf16 (default: Accelerate's launch config)."""


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cuda", "cpu"):
        raise UserError(f"--device must be auto, cuda or cpu, not {choice!r}")
    return torch.device(choice)


def _check_pool(pool: str) -> None:
    from pipelines.eval_models import POOLS

    if pool not in POOLS:
        raise UserError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")


def _prepare(cfg, log):
    from pipelines.eval_data import load_labelled
    from pipelines.eval_models import load_feature_model

    _check_pool(cfg.pool)
    device = _device(cfg.device)
    train = load_labelled(cfg.train, "--train")
    val = load_labelled(cfg.val, "--val", classes=train.classes)
    model = load_feature_model(cfg.model).to(device)
    t0 = time.perf_counter()
    train_f, train_l = extract_features(model, train, cfg.pool, cfg.batch_size, cfg.workers, cfg.cache_dir, log)
    val_f, val_l = extract_features(model, val, cfg.pool, cfg.batch_size, cfg.workers, cfg.cache_dir, log)
    seconds = time.perf_counter() - t0
    base = {"model": cfg.model, "model_sha256": model.sha256, "model_kind": model.kind, "feature_dim": train_f.shape[1],
            "pool": cfg.pool, "train": {"data": cfg.train, "images": len(train), "classes": len(train.classes)},
            "val": {"data": cfg.val, "images": len(val)},
            "transform": f"resize {round(model.img_size * 256 / 224)} bicubic, center crop {model.img_size}, mean "
                         f"{list(model.mean)}, std {list(model.std)}",
            "feature_seconds": seconds, "device": str(device), "cae2_version": cae2.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return base, train, (train_f, train_l, val_f, val_l), device


def run_knn(cfg: KnnConfig, log=print) -> dict:
    try:
        ks = tuple(int(k) for k in str(cfg.ks).split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise UserError(f"--ks {cfg.ks}: comma-separated positive numbers of neighbours, e.g. 10,20,100,200")
    base, train, (tf, tl, vf, vl), device = _prepare(cfg, log)
    results = knn_classify(tf, tl, vf, vl, len(train.classes), ks, cfg.temperature, device=device)
    record = base | {"evaluation": "knn", "temperature": cfg.temperature, "similarity": "cosine (L2-normalised)",
                     "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}}
    rows = [[f"k = {k}", f"{t1:.2f}", f"{t5:.2f}"] for k, (t1, t5) in results.items()]
    _publish(cfg.out, record, ["k-NN", "top-1 %", "top-5 %"], rows,
             {f"knn/top1_k{k}": t1 for k, (t1, _) in results.items()}, log)
    return record


def run_linear(cfg: LinearConfig, log=print) -> dict:
    if cfg.protocol not in ("features", "official"):
        raise UserError(f"--protocol must be features or official, not {cfg.protocol!r}")
    if cfg.protocol == "official":
        from pipelines.linear_probe import run_official

        result = run_official(cfg, log)
        from accelerate import PartialState

        if not PartialState().is_main_process:  # every rank has the result; one writes it
            return result
        record = {"evaluation": "linear", "protocol": "official", "model": cfg.model, "train": cfg.train,
                  "val": cfg.val, "cae2_version": cae2.__version__, "results": result}
        _publish(cfg.out, record, ["linear probe (official)", "top-1 %", "top-5 %"],
                 [["CLS, BN + Linear, LARS", f"{result['top1']:.2f}", f"{result['top5']:.2f}"]], {}, log)
        return record
    base, train, (tf, tl, vf, vl), device = _prepare(cfg, log)
    result = logistic_probe(tf, tl, vf, vl, len(train.classes), device=device)
    record = base | {"evaluation": "linear", "protocol": "features",
                     "head": "multinomial logistic regression on standardised features (L-BFGS)", "results": result}
    _publish(cfg.out, record, ["linear probe (features)", "top-1 %", "top-5 %"],
             [[f"{cfg.pool}, L2 {result['l2']:.0e}", f"{result['top1']:.2f}", f"{result['top5']:.2f}"]],
             {"linear/top1": result["top1"], "linear/top5": result["top5"]}, log)
    return record


def _publish(out: str, record: dict, headers: list[str], rows: list[list[str]], scalars: dict, log) -> None:
    """The result JSON, a printed table, and TensorBoard scalars beside the JSON."""
    from pathlib import Path

    from pipelines.linear_probe import write_json

    path = Path(out)
    write_json(path, record)
    if scalars and (path.parent.is_dir()):
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(path.with_suffix("")) + "-tensorboard") as writer:
            for k, v in scalars.items():
                writer.add_scalar(k, v, 0)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for r in [headers, ["-" * w for w in widths], *rows]:
        log("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    log(f"results: {path}")
