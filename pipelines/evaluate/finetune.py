"""`cae2 evaluate finetune`: the paper's headline protocol, end-to-end fine-tuning on labelled images,
under Accelerate and resumable like `pretrain`:

    source ViT -> timm Beit (mean-pooled patch tokens, fc_norm, relative position bias; finetune_model.py)
    -> AdamW with layer-wise lr decay (timm create_optimizer_v2), cosine with linear warmup per step
    -> RandAugment, Mixup/CutMix, label smoothing (timm), draws keyed by seed (finetune_data.py)
    -> top-1/top-5 on the validation split after every epoch; checkpoints with the data position
    -> OUT/result.json, OUT/model.safetensors (a timm Beit), metrics.jsonl and TensorBoard
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import save_file
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import cae2
from cae2.errors import UserError
from pipelines.checkpoint import Checkpointer, beit_metadata, follow_umask
from pipelines.evaluate.data import LabelledImages, load_labelled
from pipelines.evaluate.finetune_config import FinetuneConfig, FinetuneRecipe, rand_augment_string
from pipelines.evaluate.finetune_data import AugmentedImages, EvalImages, FinetunePlan, keyed
from pipelines.evaluate.finetune_model import FinetuneNet, build, load_source
from pipelines.evaluate.report import publish
from pipelines.runs import MetricsLog, Preemption, RunLock, agree, init_worker

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
        return Path(self.cfg.out)

    def trainer_state(self) -> dict:
        return {"kind": "finetune", "step": self.step, "epoch": self.epoch, "position": self.position,
                "layout": self.layout, "history": self.history, "classes": self.classes,
                "timm_model": {"class": "Beit", "kwargs": self.net.kwargs}, "config": asdict(self.cfg)}


def _splits(cfg: FinetuneConfig) -> tuple[LabelledImages, LabelledImages]:
    train = load_labelled(cfg.train, "--train")
    return train, load_labelled(cfg.val, "--val", classes=train.classes)


def setup(cfg: FinetuneConfig, log) -> Finetune:
    """Every check, then Accelerate, the network, optimizer, schedule and data; RUN_DIR written last."""
    train, val = _splits(cfg)
    source = load_source(cfg.model, cfg.seed)
    preset, recipe = cfg.recipe(source.width)
    size = cfg.input_size or recipe.input_size
    checkpointer = Checkpointer(Path(cfg.out), cfg.save_every, cfg.keep_last)
    found = checkpointer.find(cfg.resume)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                      project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=cfg.out))
    lock = RunLock.take(Path(cfg.out), acc)
    try:
        ft = _assemble(cfg, acc, source, train, val, preset, recipe, size, checkpointer, lock)
        if found[0] is not None:
            _resume(ft, *found, log)
        if acc.is_main_process:
            ft.dir.mkdir(parents=True, exist_ok=True)
            acc.init_trackers("tensorboard", config={"preset": preset, "peak_lr": ft.peak_lr, "total_steps": ft.total})
        _log_start(ft, log, size)
        return ft
    except BaseException:
        lock.release()
        raise


def _assemble(cfg, acc, source, train, val, preset, recipe, size, checkpointer, lock) -> Finetune:
    plan = FinetunePlan(len(train), acc.num_processes, cfg.batch_size, cfg.global_batch)
    set_seed(cfg.seed)
    net = build(source, cfg.seed, len(train.classes), size, recipe.drop_path, cfg.rel_pos_bias)
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
        acc.register_for_checkpointing(ema)
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
                    plan=plan, train=AugmentedImages(train, train_tf, cfg.seed), val=EvalImages(val, val_tf),
                    classes=train.classes, mixup=mixup, criterion=criterion, checkpointer=checkpointer, lock=lock,
                    layout=layout, preset=preset, recipe=recipe, peak_lr=peak, warmup_steps=warmup, total=total)


def _resume(ft: Finetune, ckpt: Path, state: dict, log) -> None:
    def check(candidate: Path, saved: dict) -> None:
        if saved.get("layout") != ft.layout:
            diff = sorted(k for k in ft.layout if saved.get("layout", {}).get(k) != ft.layout[k])
            raise UserError(f"--resume {candidate}: the checkpoint is of another run ({', '.join(diff)} differ); "
                            "resume with the original options, or start a new --out")

    ckpt, state = ft.checkpointer.restore(ft.acc, ft.cfg.resume, ckpt, state, check, log)
    ft.step, ft.epoch, ft.position, ft.history = state["step"], state["epoch"], state["position"], state["history"]
    if ft.acc.is_main_process:
        log(f"resumed from {ckpt} at step {ft.step} (epoch {ft.epoch}, micro-batch {ft.position})")


def _log_start(ft: Finetune, log, size: int) -> None:
    if not ft.acc.is_main_process:
        return
    r, cfg = ft.recipe, ft.cfg
    rule = "as given (--lr)" if cfg.lr is not None else f"the preset's {r.lr:g} x {cfg.global_batch} / {r.batch_ref}"
    log(f"finetune: {cfg.model} ({ft.net.width}-d) with the {ft.preset} recipe on {ft.acc.num_processes} "
        f"process(es); {len(ft.train)} train / {len(ft.val)} val images, {len(ft.classes)} classes, {size} px; "
        f"global batch {cfg.global_batch} = {cfg.batch_size} x {ft.acc.num_processes} x {ft.plan.grad_accum}; "
        f"peak lr {ft.peak_lr:.3g} ({rule}), layer decay {r.layer_decay}, {r.epochs:g} epochs of "
        f"{ft.plan.steps_per_epoch} steps, warmup {ft.warmup_steps}; RandAugment {r.rand_augment}, mixup {r.mixup}, "
        f"cutmix {r.cutmix}, smoothing {r.smoothing}, drop path {r.drop_path}")


def train_epoch(ft: Finetune, metrics: MetricsLog, stop, bar) -> bool:
    """The rest of the current epoch from `ft.position`; True when asked to stop (after a checkpoint)."""
    cfg, acc, plan = ft.cfg, ft.acc, ft.plan
    ft.train.epoch = ft.epoch
    indices = plan.rank_indices(cfg.seed, ft.epoch, acc.process_index)[ft.position * cfg.batch_size:]
    loader = DataLoader(Subset(ft.train, indices.tolist()), batch_size=cfg.batch_size, num_workers=cfg.workers,
                        worker_init_fn=init_worker, pin_memory=acc.device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    batches, t0 = iter(loader), time.perf_counter()
    while ft.position < plan.steps_per_epoch * plan.grad_accum and ft.step < ft.total:
        loss = train_step(ft, batches)
        bar.update(1)
        if ft.step % cfg.log_every == 0 or ft.step == ft.total:
            rate = cfg.log_every * cfg.global_batch / (time.perf_counter() - t0)
            metrics.log({"step": ft.step, "epoch": ft.epoch, "loss": float(acc.reduce(loss, reduction="mean")),
                         "lr": max(g["lr"] for g in ft.optimizer.param_groups), "samples_per_s": rate})
            t0 = time.perf_counter()
        if ft.position == plan.steps_per_epoch * plan.grad_accum:
            ft.epoch, ft.position = ft.epoch + 1, 0
            _validate_epoch(ft, metrics)
        stopping = stop()
        if ft.position == 0 or stopping or ft.checkpointer.should_save(ft.step, ft.total, False):
            ft.checkpointer.save(acc, ft.step, ft.trainer_state())
        if stopping or ft.position == 0:
            return stopping
    return False


def train_step(ft: Finetune, batches) -> torch.Tensor:
    """One optimizer step: the step's micro-batches of this rank (mixed as keyed), the scheduled lr, the update."""
    acc, plan = ft.acc, ft.plan
    ft.scheduler.step_update(num_updates=ft.step)
    total = torch.zeros((), device=acc.device)
    for m in range(plan.grad_accum):
        images, labels, _ = next(batches)
        images, labels = images.to(acc.device, non_blocking=True), labels.to(acc.device, non_blocking=True)
        step_in_epoch, chunk = plan.micro_batch(ft.position, acc.process_index)
        if ft.mixup is not None:
            with keyed("finetune-mix", ft.cfg.seed, ft.epoch, step_in_epoch, chunk):
                images, labels = ft.mixup(images, labels)
        with acc.no_sync(ft.model) if m < plan.grad_accum - 1 else torch.enable_grad(), acc.autocast():
            loss = ft.criterion(ft.model(images), labels)
            acc.backward(loss / plan.grad_accum)
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


def _validate_epoch(ft: Finetune, metrics: MetricsLog) -> None:
    record = {"step": ft.step, "epoch": ft.epoch}
    record["val_top1"], record["val_top5"] = validate(ft.acc, ft.model, ft.val, ft.cfg)
    if ft.ema is not None:
        record["ema_top1"], record["ema_top5"] = validate(ft.acc, ft.ema.module, ft.val, ft.cfg)
    ft.history.append(record)
    metrics.log(record)


@torch.no_grad()
def validate(acc: Accelerator, model: nn.Module, val: EvalImages, cfg: FinetuneConfig) -> tuple[float, float]:
    """Top-1 / top-5 % on the validation split, each rank a contiguous part, summed over ranks."""
    was_training = model.training
    model.eval()
    part = np.array_split(np.arange(len(val)), acc.num_processes)[acc.process_index]
    loader = DataLoader(Subset(val, part.tolist()), batch_size=cfg.batch_size, num_workers=cfg.workers,
                        worker_init_fn=init_worker)
    hits = torch.zeros(2, device=acc.device)
    for images, labels, _ in loader:
        with acc.autocast():
            logits = model(images.to(acc.device))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top == labels.to(acc.device).unsqueeze(1)
        hits += torch.stack([correct[:, 0].sum(), correct.any(1).sum()]).float()
    model.train(was_training)
    return tuple((100.0 * acc.reduce(hits, reduction="sum") / len(val)).tolist())


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


def run_finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Fine-tune (or resume) -> the result record; OUT/result.json and OUT/model.safetensors on the main
    process. SIGTERM or Ctrl-C saves and stops (status 'preempted' or 'interrupted')."""
    ft = setup(cfg, log)
    metrics, preempt = MetricsLog(ft.dir, ft.acc, ft.step), Preemption()
    bar = tqdm(total=ft.total, initial=ft.step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and ft.acc.is_main_process))
    t0, status = time.perf_counter(), "finished"
    try:
        while ft.step < ft.total:
            if train_epoch(ft, metrics, lambda: agree(ft.acc, preempt.requested), bar):
                status = "interrupted" if preempt.signal == "SIGINT" else "preempted"
                break
        if status == "finished" and (not ft.history or ft.history[-1]["step"] != ft.step):
            _validate_epoch(ft, metrics)  # a run that ends inside an epoch
        record = result_record(ft, time.perf_counter() - t0) | {"status": status, "run_dir": str(ft.dir)}
        if ft.acc.is_main_process and status == "finished":
            save_model(ft)
            rows = [[f"{ft.preset} recipe, {ft.step} steps", f"{record['top1']:.2f}", f"{record['top5']:.2f}"]]
            if ft.ema is not None:
                rows.append(["EMA weights", f"{record['ema_top1']:.2f}", f"{ft.history[-1]['ema_top5']:.2f}"])
            publish(str(ft.dir / "result.json"), record, ["fine-tuning", "top-1 %", "top-5 %"], rows,
                    {"finetune/top1": record["top1"]}, log)
    finally:
        preempt.restore()
        bar.close()
        metrics.close()
        ft.lock.release()
    return record


def save_model(ft: Finetune) -> Path:
    """OUT/model.safetensors: the fine-tuned network as a timm Beit (`cae2 export OUT` writes the same)."""
    out = ft.dir / "model.safetensors"
    state = {k: v.contiguous() for k, v in ft.acc.unwrap_model(ft.model).state_dict().items()}
    save_file(state, str(out), metadata=beit_metadata(ft.net.kwargs, ft.classes))
    follow_umask([out])
    return out
