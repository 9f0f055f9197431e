"""The optimisation schedule of a pretraining run, resolved once from the options, the preset and the
epoch plan, and written to RUN_DIR/config.json: steps, warmup, the lr curve, clipping, the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cae2.config import LossCombine, LossKind, TrainDefaults
from cae2.errors import UserError


def lr_at(step: int, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    processes: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    lr_rule: str
    clip_grad: float
    weight_decay: float
    loss: LossKind
    loss_combine: LossCombine

    @classmethod
    def resolve(cls, cfg, preset: TrainDefaults, batches_per_rank: int, world: int) -> Schedule:
        """cfg: a TrainConfig (None fields take the preset's value); batches_per_rank: micro-batches
        per rank in an epoch (`plan_epoch`)."""
        steps_per_epoch = batches_per_rank // cfg.grad_accum
        if steps_per_epoch < 1:
            raise UserError(f"an epoch has fewer micro-batches than --grad-accum {cfg.grad_accum}")
        epochs = cfg.epochs if cfg.epochs is not None else preset.epochs
        total = cfg.steps if cfg.steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
        warmup_epochs = cfg.warmup_epochs if cfg.warmup_epochs is not None else preset.warmup_epochs
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(warmup_epochs * steps_per_epoch)
        global_batch = cfg.batch_size * world * cfg.grad_accum

        def pick(name: str):
            value = getattr(cfg, name)
            return value if value is not None else getattr(preset, name)

        peak_lr = cfg.lr if cfg.lr is not None else preset.lr * global_batch / preset.lr_batch_ref
        if peak_lr <= pick("min_lr"):
            how = "--lr" if cfg.lr is not None else (f"the preset's lr {preset.lr:g} x global batch {global_batch} / "
                                                     f"{preset.lr_batch_ref}")
            raise UserError(f"peak lr {peak_lr:.3g} ({how}) is not above the final lr {pick('min_lr'):g} (--min-lr): "
                            "the cosine schedule would raise the lr after warmup; pass a larger --lr, a larger "
                            "global batch, or a lower --min-lr")
        return cls(processes=world, global_batch=global_batch, steps_per_epoch=steps_per_epoch, total_steps=total,
                   warmup_steps=min(warmup, total), peak_lr=peak_lr, min_lr=pick("min_lr"),
                   lr_rule="linear: lr = preset lr x global_batch / lr_batch_ref" if cfg.lr is None
                   else "explicit --lr",
                   clip_grad=pick("clip_grad"), weight_decay=pick("weight_decay"), loss=cfg.loss or preset.loss,
                   loss_combine=cfg.loss_combine or preset.loss_combine)

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps)

    def to_json(self) -> dict:
        return {"processes": self.processes, "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "peak_lr": self.peak_lr,
                "min_lr": self.min_lr, "lr_rule": self.lr_rule, "clip_grad": self.clip_grad,
                "weight_decay": self.weight_decay, "loss": str(self.loss.value),
                "loss_combine": str(self.loss_combine.value)}
