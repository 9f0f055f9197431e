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

import functools
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from cae2.errors import UserError
from pipelines.checkpoint import Checkpointer, CheckpointParts
from pipelines.evaluate.config import LinearConfig
from pipelines.evaluate.data import AugmentedImages, CenterCropImages, LabelledImages, load_labelled
from pipelines.evaluate.models import FeatureModel, load_feature_model, state_sha256
from pipelines.run_dirs import RunDir
from pipelines.run_loop import RunLoop, reduce, restore, start_accelerator
from pipelines.runs import RunLock

logger = logging.getLogger(__name__)


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


@dataclass
class Probe:
    """An official probe run, set up: the frozen model, the head and its optimizer, the plan, the position."""

    cfg: LinearConfig
    acc: Accelerator
    model: FeatureModel
    head: nn.Module
    optimizer: LARS
    plan: ProbePlan
    dataset: AugmentedImages
    val: LabelledImages
    checkpointer: Checkpointer
    run_dir: Path
    layout: dict
    peak: float
    lock: RunLock
    head_dim: int
    step: int = 0
    epoch: int = 0
    position: int = 0

    @property
    def total(self) -> int:
        return self.plan.steps_per_epoch * self.cfg.epochs

    @property
    def micro_batches(self) -> int:
        """Micro-batches per rank in an epoch."""
        return self.plan.steps_per_epoch * self.plan.grad_accum

    def parts(self) -> CheckpointParts:
        return CheckpointParts(model=self.head, optimizer=self.optimizer)

    def trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "position": self.position, "layout": self.layout,
                "config": asdict(self.cfg)}


def run_official(cfg: LinearConfig) -> dict:
    """The official probe (or its resume) -> its result, with "status": finished, or preempted (SIGTERM) /
    interrupted (Ctrl-C) after a checkpoint."""
    probe = _setup(cfg)
    t0 = time.perf_counter()
    loop = RunLoop(probe.acc, probe.checkpointer, probe.parts(), step=probe.step, total=probe.total,
                   name="linear probe", progress=cfg.progress, lock=probe.lock)
    with loop:
        probe.head.train()
        while probe.step < probe.total and not _train_epoch(probe, loop):
            pass
        if loop.status != "finished":
            return {"status": loop.status, "steps": probe.step, "status_line": loop.status_line()}
        acc, head = probe.acc, probe.acc.unwrap_model(probe.head)
        top1, top5 = _validate(acc, probe.model, head, probe.val, cfg)
        loop.log({"step": probe.step, "epoch": probe.epoch, "val/top1": top1, "val/top5": top5})
    return {"status": "finished", "top1": top1, "top5": top5, "epochs": cfg.epochs, "steps": probe.total,
            "global_batch": cfg.global_batch, "grad_accum": probe.plan.grad_accum, "processes": acc.num_processes,
            "lr": probe.peak, "blr": cfg.blr, "warmup_epochs": cfg.warmup_epochs,
            "optimizer": "LARS (momentum 0.9, weight decay 0)", "head": "BatchNorm1d(affine=False, eps=1e-6) + Linear",
            "feature": "cls", "train_transform": "RandomResizedCrop (0.08..1, bicubic) + flip",
            "run_dir": str(probe.run_dir), "head_sha256": state_sha256(head), "seconds": time.perf_counter() - t0}


def _beside(out: str, suffix: str) -> str:
    """OUT without its extension, then `suffix` (a local path or a URL)."""
    stem, dot, ext = out.rpartition(".")
    return (stem if dot and "/" not in ext else out) + suffix


def _setup(cfg: LinearConfig) -> Probe:
    """Model, splits, plan, head and LARS under Accelerate; the checkpoint to resume from, restored."""
    run = RunDir(cfg.run_dir or _beside(cfg.out, "-run"))
    run_dir = run.local
    model = load_feature_model(cfg.model, cfg.seed, cfg.quick_gelu, cfg.download)
    train = load_labelled(cfg.train, "--train")
    val = load_labelled(cfg.val, "--val", classes=train.classes)
    checkpointer = Checkpointer(run, cfg.save_every, cfg.keep_last)
    acc = start_accelerator(run_dir, cfg.mixed_precision)
    lock = RunLock.take(run, acc)
    try:
        found = checkpointer.find(cfg.resume)
        probe = _assemble(cfg, acc, model, train, val, checkpointer, run_dir, lock)
        state = restore(checkpointer, acc, cfg.resume, found, functools.partial(_check_layout, probe.layout),
                        probe.parts())
        if state is not None:
            probe.step, probe.epoch, probe.position = state["step"], state["epoch"], state["position"]
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            acc.init_trackers("linear_probe")
    except BaseException:
        lock.release()
        raise
    logger.info(f"linear probe (official): {cfg.model} ({probe.head_dim}-d CLS), {len(train)} train / {len(val)} "
                f"val images, {len(train.classes)} classes; global batch {cfg.global_batch} = {cfg.batch_size} x "
                f"{acc.num_processes} x {probe.plan.grad_accum}; lr {probe.peak:.3g}; {cfg.epochs} epochs of "
                f"{probe.plan.steps_per_epoch} steps")
    return probe


def _assemble(cfg: LinearConfig, acc: Accelerator, model: FeatureModel, train: LabelledImages, val: LabelledImages,
              checkpointer: Checkpointer, run_dir: Path, lock: RunLock) -> Probe:
    world = acc.num_processes
    micro = cfg.batch_size * world
    if cfg.global_batch % micro:
        raise UserError(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} x "
                        f"{world} process(es); pick a global batch it divides")
    plan = ProbePlan(len(train), world, cfg.batch_size, cfg.global_batch // micro)
    if plan.steps_per_epoch < 1:
        raise UserError(f"--train has {len(train)} images, fewer than one global batch of {cfg.global_batch}; "
                        "lower --global-batch")
    acc.gradient_accumulation_steps = plan.grad_accum
    peak = cfg.blr * cfg.global_batch / 256
    model.to(acc.device)
    dim = model.features(torch.zeros(1, 3, model.img_size, model.img_size, dtype=torch.uint8), "cls").shape[1]
    set_seed(cfg.seed)
    linear = nn.Linear(dim, len(train.classes))
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
    head, optimizer = acc.prepare(head, LARS(head.parameters(), lr=peak, weight_decay=0.0))
    layout = {"processes": world, "batch_size": cfg.batch_size, "global_batch": cfg.global_batch, "seed": cfg.seed,
              "train_images": len(train), "model_sha256": model.sha256}
    return Probe(cfg, acc, model, head, optimizer, plan, AugmentedImages(train, model.img_size, cfg.seed), val,
                 checkpointer, run_dir, layout, peak, lock, head_dim=dim)


def _check_layout(layout: dict, candidate: Path, saved: dict) -> None:
    if saved.get("layout") != layout:
        raise UserError(f"--resume {candidate}: another probe layout ({saved.get('layout')} vs {layout}); resume "
                        "with the original options")


def _train_epoch(probe: Probe, loop: RunLoop) -> bool:
    """The rest of the current epoch (from `probe.position`), checkpoints where due -> True: stop (SIGTERM or
    Ctrl-C; the checkpoint is saved)."""
    cfg, acc, plan = probe.cfg, probe.acc, probe.plan
    probe.dataset.epoch = probe.epoch
    indices = plan.rank_indices(cfg.seed, probe.epoch, acc.process_index)[probe.position * cfg.batch_size:]
    loader = DataLoader(torch.utils.data.Subset(probe.dataset, indices.tolist()), batch_size=cfg.batch_size,
                        num_workers=cfg.workers, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    while probe.position < probe.micro_batches:
        for group in probe.optimizer.param_groups:
            group["lr"] = probe_lr(probe.step / plan.steps_per_epoch, probe.peak, cfg.warmup_epochs, cfg.epochs)
        for _ in range(plan.grad_accum):
            images, labels, _ = next(it)
            feats = probe.model.features(images, "cls")
            with acc.accumulate(probe.head):
                loss = F.cross_entropy(probe.head(feats), labels.to(acc.device))
                acc.backward(loss)
            probe.position += 1
        probe.optimizer.step()
        probe.optimizer.zero_grad(set_to_none=True)
        probe.step += 1
        record = None
        if probe.step % cfg.log_every == 0 or probe.step == probe.total:
            record = {"step": probe.step, "epoch": probe.epoch, "train/loss": float(reduce(acc, loss.detach())),
                      "train/lr": probe.optimizer.param_groups[0]["lr"]}
        loop.step_done(probe.step, record)
        end_of_epoch = probe.position == probe.micro_batches
        if end_of_epoch:
            probe.epoch, probe.position = probe.epoch + 1, 0
        if loop.checkpoint(probe.trainer_state):
            return True
        if end_of_epoch:
            return False
    return False


@torch.no_grad()
def _validate(acc, model, head, val, cfg) -> tuple[float, float]:
    """Top-1 / top-5 % on the validation split, each rank a contiguous part, gathered."""
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
    top1, top5 = (100.0 * reduce(acc, hits, "sum") / len(val)).tolist()
    return top1, top5
