"""The official linear probe of CAE v2 / MAE (`cae2 evaluate linear --protocol official`), under
Accelerate and resumable like `pretrain`:

    frozen encoder -> CLS after the final norm -> BatchNorm1d(affine=False, eps=1e-6) -> Linear
    LARS (momentum 0.9, weight decay 0), lr = blr x global batch / 256, warmup then half-cycle cosine
    per iteration; RandomResizedCrop (0.08..1, bicubic) + flip for training (draws keyed by seed,
    epoch and image), Resize 256 + CenterCrop 224 for validation; global batch by accumulation.

Each epoch is a seeded permutation; rank r takes a contiguous slice of it, so every rank runs the
same number of steps, and the position in the epoch is a number saved with every checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cae2.errors import UserError
from pipelines.checkpoint import Checkpointer


class LARS(torch.optim.Optimizer):
    """LARS as in MAE's util/lars.py: layer-wise trust ratio on weight matrices, momentum."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm, one)
                    q = torch.where(param_norm > 0.0, trust, one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(state["mu"], alpha=-g["lr"])


def probe_lr(epoch: float, peak: float, warmup: float, epochs: float) -> float:
    """MAE's adjust_learning_rate: linear warmup, then a half-cycle cosine to 0 (epoch may be fractional)."""
    if epoch < warmup:
        return peak * epoch / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / max(epochs - warmup, 1e-9)))


@dataclass(frozen=True)
class ProbePlan:
    samples: int
    world: int
    batch_size: int
    grad_accum: int

    @property
    def per_rank(self) -> int:
        return self.samples // (self.world * self.batch_size) * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.per_rank // self.batch_size // self.grad_accum

    def rank_indices(self, seed: int, epoch: int, rank: int) -> np.ndarray:
        order = np.random.default_rng([seed, epoch, 0x11E]).permutation(self.samples)
        return order[rank * self.per_rank:(rank + 1) * self.per_rank]


def run_official(cfg, log=print) -> dict:
    """cfg: pipelines.evaluate.LinearConfig with protocol 'official'."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from pipelines.eval_data import AugmentedImages, load_labelled
    from pipelines.eval_models import load_feature_model

    run_dir = Path(cfg.run_dir or Path(cfg.out).with_suffix("").as_posix() + "-run")
    model = load_feature_model(cfg.model)
    train = load_labelled(cfg.train, "--train")
    val = load_labelled(cfg.val, "--val", classes=train.classes)
    checkpointer = Checkpointer(run_dir, cfg.save_every, cfg.keep_last)
    ckpt, state = checkpointer.find(cfg.resume)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                      project_dir=str(run_dir))
    world, rank = acc.num_processes, acc.process_index
    micro = cfg.batch_size * world
    if cfg.global_batch % micro:
        raise UserError(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} x "
                        f"{world} process(es); pick a global batch it divides")
    plan = ProbePlan(len(train), world, cfg.batch_size, cfg.global_batch // micro)
    if plan.steps_per_epoch < 1:
        raise UserError(f"--train has {len(train)} images, fewer than one global batch of {cfg.global_batch}; "
                        "lower --global-batch")
    total = plan.steps_per_epoch * cfg.epochs
    peak = cfg.blr * cfg.global_batch / 256
    model.to(acc.device)
    dim = model.features(torch.zeros(1, 3, model.img_size, model.img_size, dtype=torch.uint8), "cls").shape[1]
    set_seed(cfg.seed)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, len(train.classes)))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = LARS(head.parameters(), lr=peak, weight_decay=0.0)
    head, optimizer = acc.prepare(head, optimizer)
    layout = {"processes": world, "batch_size": cfg.batch_size, "global_batch": cfg.global_batch, "seed": cfg.seed,
              "train_images": len(train), "model_sha256": model.sha256}
    step, epoch, position = 0, 0, 0
    if ckpt is not None:
        def check(candidate, saved):
            if saved.get("layout") != layout:
                raise UserError(f"--resume {candidate}: another probe layout ({saved.get('layout')} vs {layout}); "
                                "resume with the original options")

        ckpt, state = checkpointer.restore(acc, cfg.resume, ckpt, state, check, log)
        step, epoch, position = state["step"], state["epoch"], state["position"]
        log(f"resumed from {ckpt} at step {step} (epoch {epoch}, micro-batch {position})")
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        acc.init_trackers("linear_probe")
    dataset = AugmentedImages(train, model.img_size, cfg.seed)
    log(f"linear probe (official): {cfg.model} ({dim}-d CLS), {len(train)} train / {len(val)} val images, "
        f"{len(train.classes)} classes; global batch {cfg.global_batch} = {cfg.batch_size} x {world} x "
        f"{plan.grad_accum}; lr {peak:.3g}; {cfg.epochs} epochs of {plan.steps_per_epoch} steps")
    t0 = time.perf_counter()
    head.train()
    while step < total:
        dataset.epoch = epoch
        indices = plan.rank_indices(cfg.seed, epoch, rank)[position * cfg.batch_size:]
        loader = DataLoader(torch.utils.data.Subset(dataset, indices.tolist()), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, generator=torch.Generator().manual_seed(0))
        it = iter(loader)
        while position < plan.steps_per_epoch * plan.grad_accum:
            for group in optimizer.param_groups:
                group["lr"] = probe_lr(step / plan.steps_per_epoch, peak, cfg.warmup_epochs, cfg.epochs)
            for m in range(plan.grad_accum):
                images, labels, _ = next(it)
                feats = model.features(images, "cls")
                with acc.no_sync(head) if m < plan.grad_accum - 1 else torch.enable_grad():
                    loss = F.cross_entropy(head(feats), labels.to(acc.device))
                    acc.backward(loss / plan.grad_accum)
                position += 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == total:
                acc.log({"train/loss": float(acc.reduce(loss.detach(), reduction="mean")),
                         "train/lr": optimizer.param_groups[0]["lr"]}, step=step)
            if position == plan.steps_per_epoch * plan.grad_accum:
                epoch, position = epoch + 1, 0
            if checkpointer.should_save(step, total, False):
                checkpointer.save(acc, step, {"step": step, "epoch": epoch, "position": position, "layout": layout,
                                              "config": asdict(cfg)})
            if position == 0:
                break
    top1, top5 = _validate(acc, model, acc.unwrap_model(head), val, cfg)
    acc.log({"val/top1": top1, "val/top5": top5}, step=step)
    acc.end_training()
    return {"top1": top1, "top5": top5, "epochs": cfg.epochs, "steps": total, "global_batch": cfg.global_batch,
            "grad_accum": plan.grad_accum, "processes": world, "lr": peak, "blr": cfg.blr,
            "warmup_epochs": cfg.warmup_epochs, "optimizer": "LARS (momentum 0.9, weight decay 0)",
            "head": "BatchNorm1d(affine=False, eps=1e-6) + Linear", "feature": "cls",
            "train_transform": "RandomResizedCrop (0.08..1, bicubic) + flip", "run_dir": str(run_dir),
            "head_sha256": _sha(acc.unwrap_model(head)), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def _validate(acc, model, head, val, cfg) -> tuple[float, float]:
    """Top-1 / top-5 % on the validation split, each rank a contiguous part, gathered."""
    from torch.utils.data import DataLoader

    from pipelines.eval_data import CenterCropImages

    head.eval()
    part = np.array_split(np.arange(len(val)), acc.num_processes)[acc.process_index]
    loader = DataLoader(torch.utils.data.Subset(CenterCropImages(val, model.img_size), part.tolist()),
                        batch_size=cfg.batch_size, num_workers=cfg.workers)
    hits = torch.zeros(2, device=acc.device)
    for images, labels, _ in loader:
        logits = head(model.features(images, "cls"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top == labels.to(acc.device).unsqueeze(1)
        hits += torch.stack([correct[:, 0].sum(), correct.any(1).sum()]).float()
    hits = acc.reduce(hits, reduction="sum")
    return (100.0 * hits / len(val)).tolist()


def _sha(module: nn.Module) -> str:
    from pipelines.eval_models import state_sha256

    return state_sha256(module)


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
