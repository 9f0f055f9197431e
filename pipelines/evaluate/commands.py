"""`cae2 evaluate knn` and `cae2 evaluate linear`: load the model and the labelled splits, extract
features, classify, publish the result JSON, a table and TensorBoard scalars."""

from __future__ import annotations

import datetime as dt
import time

import torch
from accelerate import PartialState

import cae2
from cae2.errors import UserError
from pipelines.evaluate.config import KnnConfig, LinearConfig
from pipelines.evaluate.data import eval_resize, load_labelled
from pipelines.evaluate.features import extract_features
from pipelines.evaluate.knn import knn_classify
from pipelines.evaluate.linear_probe import run_official
from pipelines.evaluate.logistic import logistic_probe
from pipelines.evaluate.models import load_feature_model
from pipelines.evaluate.report import publish


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible to this process; use --device cpu or auto")
    return torch.device(choice)


def load_model(cfg):
    """The --model of an evaluation config, with its seed, QuickGELU and download settings."""
    return load_feature_model(cfg.model, cfg.seed, cfg.quick_gelu, cfg.download)


def _prepare(cfg: KnnConfig | LinearConfig):
    device = _device(cfg.device)
    train = load_labelled(cfg.train, "--train")
    val = load_labelled(cfg.val, "--val", classes=train.classes)
    model = load_model(cfg).to(device)
    t0 = time.perf_counter()
    train_f, train_l = extract_features(model, train, cfg.pool, cfg.batch_size, cfg.workers, cfg.cache_dir)
    val_f, val_l = extract_features(model, val, cfg.pool, cfg.batch_size, cfg.workers, cfg.cache_dir)
    seconds = time.perf_counter() - t0
    base = {"model": cfg.model, "model_sha256": model.sha256, "model_kind": model.kind, "feature_dim": train_f.shape[1],
            "pool": cfg.pool, "train": {"data": cfg.train, "images": len(train), "classes": len(train.classes)},
            "val": {"data": cfg.val, "images": len(val)},
            "transform": f"resize {eval_resize(model.img_size)} bicubic, center crop {model.img_size}, mean "
                         f"{list(model.mean)}, std {list(model.std)}",
            "feature_seconds": seconds, "device": str(device), "cae2_version": cae2.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return base, train, (train_f, train_l, val_f, val_l), device


def run_knn(cfg: KnnConfig) -> dict:
    ks = cfg.neighbours()
    base, train, (tf, tl, vf, vl), device = _prepare(cfg)
    results = knn_classify(tf, tl, vf, vl, len(train.classes), ks, cfg.temperature, device=device)
    record = base | {"evaluation": "knn", "temperature": cfg.temperature, "similarity": "cosine (L2-normalised)",
                     "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in results.items()}}
    rows = [[f"k = {k}", f"{t1:.2f}", f"{t5:.2f}"] for k, (t1, t5) in results.items()]
    publish(cfg.out, record, ["k-NN", "top-1 %", "top-5 %"], rows,
             {f"knn/top1_k{k}": t1 for k, (t1, _) in results.items()})
    return record


def run_linear(cfg: LinearConfig) -> dict:
    if cfg.protocol == "official":
        result = run_official(cfg)
        if result["status"] != "finished" or not PartialState().is_main_process:  # one rank writes the result
            return result
        record = {"evaluation": "linear", "protocol": "official", "model": cfg.model, "train": cfg.train,
                  "val": cfg.val, "cae2_version": cae2.__version__, "results": result}
        publish(cfg.out, record, ["linear probe (official)", "top-1 %", "top-5 %"],
                 [["CLS, BN + Linear, LARS", f"{result['top1']:.2f}", f"{result['top5']:.2f}"]], {})
        return record
    base, train, (tf, tl, vf, vl), device = _prepare(cfg)
    result = logistic_probe(tf, tl, vf, vl, len(train.classes), seed=cfg.seed, device=device)
    record = base | {"evaluation": "linear", "protocol": "features",
                     "head": "multinomial logistic regression on standardised features (L-BFGS)", "results": result}
    publish(cfg.out, record, ["linear probe (features)", "top-1 %", "top-5 %"],
             [[f"{cfg.pool}, L2 {result['l2']:.0e}", f"{result['top1']:.2f}", f"{result['top5']:.2f}"]],
             {"linear/top1": result["top1"], "linear/top5": result["top5"]})
    return record
