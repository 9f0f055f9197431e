"""`cae2 evaluate finetune`: the paper's headline protocol, end-to-end fine-tuning on labelled images,
under Accelerate and resumable like `pretrain`:

    source ViT -> timm Beit (mean-pooled patch tokens, fc_norm, relative position bias; finetune_model.py)
    -> AdamW with layer-wise lr decay (timm create_optimizer_v2), cosine with linear warmup per step
    -> RandAugment, Mixup/CutMix, label smoothing (timm), draws keyed by seed (finetune_data.py)
    -> top-1/top-5 on the validation split after every epoch (TensorBoard: misclassified images); checkpoints
       with the data position
    -> OUT/result.json, OUT/model.safetensors (a timm Beit), metrics.jsonl and TensorBoard
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.beit import Beit
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset

import cae2
from cae2.errors import UserError
from pipelines.checkpoint import Checkpointer, CheckpointParts
from pipelines.evaluate.data import LabelledImages, load_labelled
from pipelines.evaluate.finetune_config import FinetuneConfig, FinetuneRecipe, rand_augment_string
from pipelines.evaluate.finetune_data import AugmentedImages, EvalImages, FinetunePlan, keyed
from pipelines.evaluate.finetune_model import FinetuneNet, SourceViT, build, load_source
from pipelines.evaluate.misclassified import Misclassified
from pipelines.evaluate.report import publish
from pipelines.files import follow_umask
from pipelines.run_dirs import RunDir
from pipelines.run_loop import RunLoop, reduce, restore, start_accelerator
from pipelines.runs import RunLock, init_worker
from pipelines.weights import beit_metadata

logger = logging.getLogger(__name__)
RANDOM_ERASING = 0.25  # the authors' fine-tuning default (--reprob 0.25); not in Table 9


@dataclass
class Finetune:
    """A fine-tuning run, set up and (when resumed) restored."""

    cfg: FinetuneConfig
    acc: Accelerator
    net: FinetuneNet
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    ema: ModelEmaV3 | None
    plan: FinetunePlan
    train: AugmentedImages
    val: EvalImages
    classes: list[str]
    mixup: Mixup | None
    criterion: nn.Module
    checkpointer: Checkpointer
    lock: RunLock
    layout: dict
    preset: str
    recipe: FinetuneRecipe
    peak_lr: float
    warmup_steps: int
    total: int
    step: int = 0
    epoch: int = 0
    position: int = 0
    history: list = field(default_factory=list)

    @property
    def dir(self) -> Path:
        """Where the run works (an object-store run's staging folder)."""
        return self.checkpointer.run_dir

    def parts(self) -> CheckpointParts:
        return CheckpointParts(model=self.model, optimizer=self.optimizer,
                               extra={"ema": self.ema} if self.ema is not None else {})

    def trainer_state(self) -> dict:
        return {"kind": "finetune", "step": self.step, "epoch": self.epoch, "position": self.position,
                "layout": self.layout, "history": self.history, "classes": self.classes,
                "timm_model": {"class": "Beit", "kwargs": self.net.kwargs}, "config": asdict(self.cfg)}


@dataclass(frozen=True)
class Inputs:
    """What a fine-tuning run starts from: the labelled splits, the source network and its recipe."""

    train: LabelledImages
    val: LabelledImages
    source: SourceViT
    preset: str
    recipe: FinetuneRecipe
    size: int

    @classmethod
    def of(cls, cfg: FinetuneConfig) -> Inputs:
        train = load_labelled(cfg.train, "--train")
        val = load_labelled(cfg.val, "--val", classes=train.classes)
        source = load_source(cfg.model, cfg.seed)
        preset, recipe = cfg.recipe(source.width)
        return cls(train, val, source, preset, recipe, cfg.input_size or recipe.input_size)


def setup(cfg: FinetuneConfig) -> Finetune:
    """Every check, then Accelerate, the network, optimizer, schedule and data; RUN_DIR written last."""
    inputs = Inputs.of(cfg)
    run = RunDir(cfg.out)
    checkpointer = Checkpointer(run, cfg.save_every, cfg.keep_last)
    acc = start_accelerator(run.local, cfg.mixed_precision)
    lock = RunLock.take(run, acc)
    try:
        found = checkpointer.find(cfg.resume)
        ft = _assemble(cfg, acc, inputs, checkpointer, lock)
        state = restore(checkpointer, acc, cfg.resume, found, functools.partial(_check_layout, ft.layout), ft.parts())
        if state is not None:
            ft.step, ft.epoch, ft.position, ft.history = (state[k] for k in ("step", "epoch", "position", "history"))
        if acc.is_main_process:
            ft.dir.mkdir(parents=True, exist_ok=True)
            acc.init_trackers("tensorboard", config={"preset": ft.preset, "peak_lr": ft.peak_lr,
                                                     "total_steps": ft.total})
        _log_start(ft, inputs.size)
        return ft
    except BaseException:
        lock.release()
        raise


def _assemble(cfg: FinetuneConfig, acc: Accelerator, inputs: Inputs, checkpointer: Checkpointer,
              lock: RunLock) -> Finetune:
    train, recipe, size = inputs.train, inputs.recipe, inputs.size
    plan = FinetunePlan(len(train), acc.num_processes, cfg.batch_size, cfg.global_batch)
    acc.gradient_accumulation_steps = plan.grad_accum
    set_seed(cfg.seed)
    net = build(inputs.source, cfg.seed, len(train.classes), size, recipe.drop_path, cfg.rel_pos_bias)
    peak = cfg.lr if cfg.lr is not None else recipe.lr * cfg.global_batch / recipe.batch_ref
    total = max(1, round(recipe.epochs * plan.steps_per_epoch))
    warmup = min(round(recipe.warmup_epochs * plan.steps_per_epoch), total - 1)
    optimizer = create_optimizer_v2(net.net, opt="adamw", lr=peak, weight_decay=recipe.weight_decay,
                                    layer_decay=recipe.layer_decay, betas=recipe.betas)
    scheduler = CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=recipe.min_lr, warmup_t=warmup,
                                  warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    ema = ModelEmaV3(net.net, decay=cfg.ema_decay) if cfg.model_ema else None
    model, optimizer = acc.prepare(net.net, optimizer)
    if ema is not None:
        ema.to(acc.device)
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                      num_classes=len(train.classes))
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(recipe.smoothing) \
        if recipe.smoothing > 0 else nn.CrossEntropyLoss()
    train_tf = create_transform(size, is_training=True, color_jitter=recipe.color_jitter, interpolation="bicubic",
                                auto_augment=rand_augment_string(recipe.rand_augment), re_prob=RANDOM_ERASING,
                                mean=net.mean, std=net.std)
    val_tf = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=224 / 256, mean=net.mean,
                              std=net.std)
    layout = {"processes": acc.num_processes, "batch_size": cfg.batch_size, "global_batch": cfg.global_batch,
              "seed": cfg.seed, "train": train.identity, "model": cfg.model, "width": net.width}
    return Finetune(cfg=cfg, acc=acc, net=net, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                    plan=plan, train=AugmentedImages(train, train_tf, cfg.seed), val=EvalImages(inputs.val, val_tf),
                    classes=train.classes, mixup=mixup, criterion=criterion, checkpointer=checkpointer, lock=lock,
                    layout=layout, preset=inputs.preset, recipe=recipe, peak_lr=peak, warmup_steps=warmup, total=total)


def _check_layout(layout: dict, candidate: Path, saved: dict) -> None:
    if saved.get("layout") != layout:
        diff = sorted(k for k in layout if saved.get("layout", {}).get(k) != layout[k])
        raise UserError(f"--resume {candidate}: the checkpoint is of another run ({', '.join(diff)} differ); "
                        "resume with the original options, or start a new --out")


def _log_start(ft: Finetune, size: int) -> None:
    r, cfg = ft.recipe, ft.cfg
    rule = "as given (--lr)" if cfg.lr is not None else f"the preset's {r.lr:g} x {cfg.global_batch} / {r.batch_ref}"
    logger.info(
        f"finetune: {cfg.model} ({ft.net.width}-d) with the {ft.preset} recipe on {ft.acc.num_processes} "
        f"process(es); {len(ft.train)} train / {len(ft.val)} val images, {len(ft.classes)} classes, {size} px; "
        f"global batch {cfg.global_batch} = {cfg.batch_size} x {ft.acc.num_processes} x {ft.plan.grad_accum}; "
        f"peak lr {ft.peak_lr:.3g} ({rule}), layer decay {r.layer_decay}, {r.epochs:g} epochs of "
        f"{ft.plan.steps_per_epoch} steps, warmup {ft.warmup_steps}; RandAugment {r.rand_augment}, mixup {r.mixup}, "
        f"cutmix {r.cutmix}, smoothing {r.smoothing}, drop path {r.drop_path}")


def train_epoch(ft: Finetune, loop: RunLoop) -> bool:
    """The rest of the current epoch from `ft.position`, a checkpoint at its end and where due -> True: stop
    (SIGTERM or Ctrl-C; the checkpoint is saved)."""
    cfg, acc, plan = ft.cfg, ft.acc, ft.plan
    ft.train.epoch = ft.epoch
    indices = plan.rank_indices(cfg.seed, ft.epoch, acc.process_index)[ft.position * cfg.batch_size:]
    loader = DataLoader(Subset(ft.train, indices.tolist()), batch_size=cfg.batch_size, num_workers=cfg.workers,
                        worker_init_fn=init_worker, pin_memory=acc.device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    batches, t0 = iter(loader), time.perf_counter()
    while ft.position < plan.steps_per_epoch * plan.grad_accum and ft.step < ft.total:
        loss = train_step(ft, batches)
        record = None
        if ft.step % cfg.log_every == 0 or ft.step == ft.total:
            rate = cfg.log_every * cfg.global_batch / (time.perf_counter() - t0)
            record = {"step": ft.step, "epoch": ft.epoch, "loss": float(reduce(acc, loss)),
                      "lr": max(g["lr"] for g in ft.optimizer.param_groups), "samples_per_s": rate}
            t0 = time.perf_counter()
        loop.step_done(ft.step, record, f"loss {record['loss']:.4f}" if record else None)
        if ft.position == plan.steps_per_epoch * plan.grad_accum:
            ft.epoch, ft.position = ft.epoch + 1, 0
            _validate_epoch(ft, loop)
        if loop.checkpoint(ft.trainer_state, due=ft.position == 0):
            return True
        if ft.position == 0:
            return False
    return False


def train_step(ft: Finetune, batches) -> torch.Tensor:
    """One optimizer step: the step's micro-batches of this rank (mixed as keyed; Accelerate's accumulate
    divides each loss by their count), the scheduled lr, the update."""
    acc, plan = ft.acc, ft.plan
    ft.scheduler.step_update(num_updates=ft.step)
    total = torch.zeros((), device=acc.device)
    for _ in range(plan.grad_accum):
        images, labels, _ = next(batches)
        images, labels = images.to(acc.device, non_blocking=True), labels.to(acc.device, non_blocking=True)
        step_in_epoch, chunk = plan.micro_batch(ft.position, acc.process_index)
        if ft.mixup is not None:
            with keyed("finetune-mix", ft.cfg.seed, ft.epoch, step_in_epoch, chunk):
                images, labels = ft.mixup(images, labels)
        with acc.accumulate(ft.model), acc.autocast():
            loss = ft.criterion(ft.model(images), labels)
            acc.backward(loss)
        total += loss.detach() / plan.grad_accum
        ft.position += 1
    if not torch.isfinite(total):
        raise UserError(f"step {ft.step + 1}: the loss is not finite ({float(total):.4g}); nothing of the step was "
                        "applied: resume with a lower --lr")
    ft.optimizer.step()
    ft.optimizer.zero_grad(set_to_none=True)
    ft.step += 1
    if ft.ema is not None:
        ft.ema.update(acc.unwrap_model(ft.model), step=ft.step)
    return total


def _validate_epoch(ft: Finetune, loop: RunLoop) -> None:
    record: dict[str, float] = {"step": ft.step, "epoch": ft.epoch}
    missed = None
    if ft.cfg.misclassified and ft.acc.is_main_process:
        missed = Misclassified(ft.cfg.misclassified, ft.net.mean, ft.net.std)
    record["val_top1"], record["val_top5"] = validate(ft.acc, ft.model, ft.val, ft.cfg, missed)
    if ft.ema is not None:
        record["ema_top1"], record["ema_top5"] = validate(ft.acc, ft.ema.module, ft.val, ft.cfg)
    ft.history.append(record)
    loop.log(record)
    if missed is not None:
        encoder = ft.acc.unwrap_model(ft.model)
        assert isinstance(encoder, Beit)
        missed.write(encoder, ft.acc.get_tracker("tensorboard", unwrap=True), ft.step, ft.classes,
                     ft.val.data.name)


@torch.no_grad()
def validate(acc: Accelerator, model: nn.Module, val: EvalImages, cfg: FinetuneConfig,
             missed: Misclassified | None = None) -> tuple[float, float]:
    """Top-1 / top-5 % on the validation split, each rank a contiguous part, summed over ranks; `missed`
    collects this rank's first misclassified images."""
    was_training = model.training
    model.eval()
    part = np.array_split(np.arange(len(val)), acc.num_processes)[acc.process_index]
    loader = DataLoader(Subset(val, part.tolist()), batch_size=cfg.batch_size, num_workers=cfg.workers,
                        worker_init_fn=init_worker)
    hits = torch.zeros(2, device=acc.device)
    for images, labels, indices in loader:
        with acc.autocast():
            logits = model(images.to(acc.device))
        if missed is not None and not missed.full:
            missed.add(images, labels, logits.cpu(), indices)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top == labels.to(acc.device).unsqueeze(1)
        hits += torch.stack([correct[:, 0].sum(), correct.any(1).sum()]).float()
    model.train(was_training)
    top1, top5 = (100.0 * reduce(acc, hits, "sum") / len(val)).tolist()
    return top1, top5


def result_record(ft: Finetune, seconds: float) -> dict:
    final = ft.history[-1] if ft.history else {}
    best = max(ft.history, key=lambda r: r["val_top1"]) if ft.history else {}
    return {"evaluation": "finetune", "model": ft.cfg.model, "train": ft.cfg.train, "val": ft.cfg.val,
            "preset": ft.preset, "recipe": asdict(ft.recipe), "peak_lr": ft.peak_lr,
            "global_batch": ft.cfg.global_batch,
            "processes": ft.acc.num_processes, "steps": ft.step, "warmup_steps": ft.warmup_steps,
            "top1": final.get("val_top1"), "top5": final.get("val_top5"), "best_top1": best.get("val_top1"),
            "best_epoch": best.get("epoch"), "ema_top1": final.get("ema_top1"), "history": ft.history,
            "rel_pos_bias": ft.cfg.rel_pos_bias, "random_erasing": RANDOM_ERASING, "seconds": seconds,
            "cae2_version": cae2.__version__, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or resume) -> the result record; OUT/result.json and OUT/model.safetensors on the main
    process. SIGTERM or Ctrl-C saves and stops (status 'preempted' or 'interrupted')."""
    ft = setup(cfg)
    t0 = time.perf_counter()
    loop = RunLoop(ft.acc, ft.checkpointer, ft.parts(), step=ft.step, total=ft.total, name="finetune",
                   progress=cfg.progress, lock=ft.lock)
    with loop:
        while ft.step < ft.total and not train_epoch(ft, loop):
            pass
        if loop.status == "finished" and (not ft.history or ft.history[-1]["step"] != ft.step):
            _validate_epoch(ft, loop)  # a run that ends inside an epoch
        record = result_record(ft, time.perf_counter() - t0) | {"status": loop.status, "run_dir": str(ft.dir),
                                                                 "status_line": loop.status_line()}
        if ft.acc.is_main_process and loop.status == "finished":
            save_model(ft)
            rows = [[f"{ft.preset} recipe, {ft.step} steps", f"{record['top1']:.2f}", f"{record['top5']:.2f}"]]
            if ft.ema is not None:
                rows.append(["EMA weights", f"{record['ema_top1']:.2f}", f"{ft.history[-1]['ema_top5']:.2f}"])
            publish(str(ft.dir / "result.json"), record, ["fine-tuning", "top-1 %", "top-5 %"], rows,
                    {"finetune/top1": record["top1"]})
    return record


def save_model(ft: Finetune) -> Path:
    """OUT/model.safetensors: the fine-tuned network as a timm Beit (`cae2 export OUT` writes the same)."""
    out = ft.dir / "model.safetensors"
    state = {k: v.contiguous() for k, v in ft.acc.unwrap_model(ft.model).state_dict().items()}
    save_file(state, str(out), metadata=beit_metadata(ft.net.kwargs, ft.classes))
    follow_umask([out])
    return out
