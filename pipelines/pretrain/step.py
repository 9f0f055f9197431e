"""One optimizer step of CAE v2 pretraining, and what it reports."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import torch
from accelerate import Accelerator

import cae2
from cae2.config import IMAGENET_MEAN, IMAGENET_STD, TrainDefaults
from cae2.errors import UserError
from pipelines.pretrain.schedule import Schedule
from pipelines.pretrain.snapshots import Snapshots
from pipelines.run_loop import reduce
from targets.decoders import decode_all
from targets.device_views import DeviceViews, PackedImages
from targets.quantize import dequantize
from targets.views import normalize

logger = logging.getLogger(__name__)

def make_optimizer(model: cae2.CAEv2, preset: TrainDefaults, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """The preset's AdamW (betas, eps; no decay on norms, biases and the preset's tokens), fused: one
    vectorised kernel per parameter on CPU and CUDA instead of ~6 elementwise ops each."""
    return torch.optim.AdamW(model.param_groups(weight_decay, preset.decay_tokens), lr=lr, betas=preset.betas,
                             eps=preset.eps, fused=True)


@dataclass
class StepStats:
    losses: torch.Tensor
    """[loss, loss_v, loss_z] of this process, averaged over the step's micro-batches."""
    grad_norm: torch.Tensor
    lr: float
    wait: float
    """Seconds spent waiting for the data loader."""


@dataclass
class LogWindow:
    """Throughput and data waiting over the optimizer steps since the last metrics record."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0

    def add(self, stats: StepStats) -> None:
        self.wait += stats.wait
        self.steps += 1

    def record(self, accelerator: Accelerator, stats: StepStats, step: int, epoch: int, global_batch: int) -> dict:
        """The metrics record of the last step (losses averaged over processes) and the window's rates."""
        reduced = reduce(accelerator, stats.losses).tolist()
        elapsed = time.perf_counter() - self.t0
        return {"step": step, "epoch": epoch, "loss": reduced[0], "loss_v": reduced[1], "loss_z": reduced[2],
                "lr": stats.lr, "grad_norm": float(stats.grad_norm),
                "samples_per_s": self.steps * global_batch / elapsed, "data_wait_frac": min(1.0, self.wait / elapsed)}


@dataclass
class StepParts:
    """What one optimizer step needs."""

    accelerator: Accelerator
    model: torch.nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """The model, or its torch.compile wrapper: (images, mask) -> predictions."""
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    n_visible: int
    teacher: torch.nn.Module | None = None
    """--teacher-online: targets from the teacher instead of the store."""
    student_views: DeviceViews | None = None
    teacher_views: DeviceViews | None = None
    keys_file: IO[str] | None = None
    snapshots: Snapshots | None = None
    """--image-every: the fixed samples of the TensorBoard pictures (kept from the first batch)."""

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A loader batch -> (normalised images, mask, targets) on the device."""
        device = self.accelerator.device
        raw = self._device_views(batch, self.student_views) if self.student_views \
            else batch["images"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        if self.teacher is not None:
            return normalize(raw, IMAGENET_MEAN, IMAGENET_STD), mask, self.teacher(self._teacher_views(batch, raw))
        targets = batch["targets"].to(device, non_blocking=True)
        if "target_scales" in batch:  # int8 store
            targets = dequantize(targets, batch["target_scales"].to(device, non_blocking=True))
        return normalize(raw, IMAGENET_MEAN, IMAGENET_STD), mask, targets

    def _teacher_views(self, batch: dict, student: torch.Tensor) -> torch.Tensor:
        """The teacher's view of each sample (--teacher-online): the student's when sizes match."""
        if "teacher_images" in batch:
            return batch["teacher_images"]
        if "teacher_from_pack" in batch and self.teacher_views is not None:
            return self._device_views(batch, self.teacher_views)
        return student

    @staticmethod
    def _device_views(batch: dict, views: DeviceViews) -> torch.Tensor:
        """The device view path: the batch's crops (one packed buffer), and its JPEG files decoded on the
        device (--decoder device), cut into views there."""
        if "device_pack" not in batch:  # student and teacher views (--teacher-online) share it
            batch["device_pack"] = _device_pack(batch, views.device)
        return views.render(batch["device_pack"], torch.arange(len(batch["view_ints"])), batch["view_ints"],
                            batch["view_floats"])


def _device_pack(batch: dict, device: torch.device) -> PackedImages:
    pack = batch["view_pack"].to(device)
    if "view_jpegs" not in batch:
        return pack
    decoded = decode_all(batch["view_jpegs"], device)
    at = batch["view_jpeg_at"].tolist()
    for i, image in zip(at, decoded, strict=True):
        if isinstance(image, str):
            raise UserError(f"--decoder device: sample {batch['keys'][i]}: {image}; stage 1 decoded it with another "
                            "decoder: pass --decoder host")
    crops, jpegs = iter(pack.images()), iter(image for image in decoded if not isinstance(image, str))
    jpeg_places = set(at)
    return PackedImages.join([next(jpegs) if i in jpeg_places else next(crops) for i in range(len(batch["view_ints"]))],
                             device)


def train_step(parts: StepParts, batches, step: int, epoch: int) -> StepStats:
    """One optimizer step: the accelerator's `gradient_accumulation_steps` micro-batches (its accumulate:
    each loss divided by their count, gradients synchronised on the last), clipping, the scheduled lr, the
    update."""
    acc = parts.accelerator
    micro_batches = acc.gradient_accumulation_steps
    losses = torch.zeros(3, device=acc.device)
    wait, keys = 0.0, []
    for _ in range(micro_batches):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        for warning in batch.get("warnings", ()):  # said by the loader worker that made the batch
            logger.warning(warning)
        images, mask, targets = parts.inputs(batch)
        if parts.snapshots is not None:
            parts.snapshots.keep(images, mask, targets)
        with acc.accumulate(parts.model):
            torch.compiler.cudagraph_mark_step_begin()  # --compile-mode reduce-overhead: a new replay
            pred = parts.forward(images, mask)
            out = cae2.alignment_loss(pred, cae2.CAEv2.arrange_targets(targets, mask), parts.n_visible,
                                      parts.schedule.loss, parts.schedule.loss_combine)
            acc.backward(out.loss)
        losses += torch.stack([out.loss.detach(), out.loss_v.detach(), out.loss_z.detach()]).float()
        keys += batch["keys"]
        if parts.keys_file:
            parts.keys_file.write("".join(f"{step} {epoch} {k}\n" for k in batch["keys"]))
    grad_norm = torch.as_tensor(acc.clip_grad_norm_(parts.model.parameters(), parts.schedule.clip_grad))
    if not torch.isfinite(grad_norm):  # the same on every rank (gradients are all-reduced); nothing is applied
        raise UserError(f"step {step + 1}: the loss or a gradient is not finite (loss {float(losses[0]):.4g}, "
                        f"gradient norm {float(grad_norm):.4g}); this rank's samples of the step: "
                        f"{', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}. Nothing of the step was applied "
                        "and the checkpoints are untouched: check these samples' targets (cae2 verify-targets), "
                        "or resume with a lower --lr")
    lr = parts.schedule.lr(step)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return StepStats(losses / micro_batches, grad_norm, lr, wait)
