"""Stage 2: CAE v2 pretraining on cached CLIP targets, under Accelerate, resumable.

    preflight checks (store vs shards vs model; before anything is written)
    -> model, AdamW param groups, Accelerator.prepare (never the WebDataset loader)
    -> per optimizer step: `grad_accum` micro-batches -> clip -> lr (warmup + cosine, by step) -> step
    -> metrics.jsonl + TensorBoard, checkpoints every `save_every` steps, at the end and on SIGTERM
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cae2
from cae2.config import IMAGENET_MEAN, IMAGENET_STD, LossCombine, LossKind, MaskStrategy, ModelConfig, TrainDefaults
from cae2.errors import UserError
from pipelines.checkpoint import Checkpointer
from pipelines.data import StreamConfig, index_shards, make_loader, plan_epoch, start_loader
from pipelines.extract import VIEW_PATHS, resolve_view_path, where_views_are_cut
from pipelines.schedule import Schedule
from pipelines.shards import expand_shards
from targets.cache import StoreMeta, TargetStore
from targets.claims import Heartbeat, Holder, release, try_claim
from targets.device_views import DECODERS, DeviceViews
from targets.quantize import dequantize
from targets.teacher import teacher_for_store
from targets.views import ViewSettings, normalize


@dataclass(kw_only=True)
class TrainConfig:
    """Every option of `cae2 pretrain` (the command line is generated from these fields). None means:
    the --model preset's default."""

    shards: str
    """Training shards: a brace pattern, a directory, a glob, or a file listing URLs."""
    targets: str
    """Target store made by extract-targets from these shards."""
    model: str = "cae2_vit_base"
    """Preset name (`cae2 models`)."""
    out: str = "runs/cae2"
    """Run directory: config.json, metrics.jsonl, TensorBoard, checkpoints."""
    steps: int | None = None
    """Optimizer steps; overrides --epochs."""
    epochs: float | None = None
    """Epochs of the data."""
    batch_size: int = 64
    """Per process and micro-batch. Global batch = batch_size x processes x grad_accum."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float | None = None
    """Peak lr at the global batch in use; default: the preset's lr x global batch / its lr_batch_ref."""
    min_lr: float | None = None
    """Final lr of the cosine schedule."""
    warmup_epochs: float | None = None
    """Linear warmup, in epochs."""
    warmup_steps: int | None = None
    """Linear warmup, in steps; overrides --warmup-epochs."""
    weight_decay: float | None = None
    """AdamW weight decay."""
    clip_grad: float | None = None
    """Gradient clipping max norm."""
    drop_path: float | None = None
    """Stochastic depth rate."""
    target_dim: int | None = None
    """Head output dim; must equal the store's teacher dim."""
    mask_strategy: MaskStrategy | None = None
    """Masking (block as in the paper; random for ablations)."""
    loss: LossKind | None = None
    """Token distance."""
    loss_combine: LossCombine | None = None
    """tokens (the code), sum (the paper), visible, masked."""
    seed: int = 0
    """Seed of the initialisation, the data order, the view index and the masks."""
    log_every: int = 10
    """Steps between metrics records."""
    save_every: int = 1000
    """Steps between checkpoints (also at the end and on SIGTERM)."""
    keep_last: int = 3
    """Complete checkpoints to keep."""
    resume: str | None = None
    """'latest' (newest complete checkpoint of --out) or a checkpoint path."""
    teacher_online: bool = False
    """Run the teacher every step instead of reading the store (the baseline the cache replaces)."""
    allow_random_teacher: bool = False
    """Accept a store made by a randomly initialised teacher (tests, demos)."""
    compile: bool = False
    """torch.compile the student (and the online teacher)."""
    view_path: str = "auto"
    """pillow: the loader workers cut the views; device: they decode and crop, the views are cut on the
    training device (bit-identical); auto: device when training on a GPU."""
    workers: int = 4
    """Data-loader worker processes per process."""
    shuffle_buffer: int = 1000
    """Samples in each worker's shuffle buffer."""
    mixed_precision: str | None = None
    """no, fp16 or bf16; default: Accelerate's launch config."""
    log_keys: bool = False
    """Write every sample key per step to RUN_DIR/keys/rank<r>.txt (audits of the data order)."""
    corrupt_targets: str = "stop"
    """A cached view whose bytes fail their checksum: stop (naming unit, row, key), skip (leave the sample
    out of its batch, with a warning), or off."""
    eval_every: int = 0
    """Steps between k-NN evaluations of the student on --eval-data (0: none); in metrics.jsonl and
    TensorBoard, without touching the data order or the random state."""
    eval_data: str | None = None
    """Labelled images for --eval-every: a folder with train/ and val/ in the ImageFolder layout."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise UserError("--steps must be >= 1")
        if self.view_path not in VIEW_PATHS:
            raise UserError(f"--view-path must be one of {', '.join(VIEW_PATHS)}, not {self.view_path!r}")
        if self.corrupt_targets not in ("stop", "skip", "off"):
            raise UserError(f"--corrupt-targets must be stop, skip or off, not {self.corrupt_targets!r}")
        if self.eval_every < 0 or (self.eval_every and not self.eval_data):
            raise UserError("--eval-every N needs N >= 0 and --eval-data (a folder with train/ and val/)")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _model_config(cfg: TrainConfig) -> ModelConfig:
    names = ("drop_path", "mask_strategy", "target_dim")
    overrides = {k: getattr(cfg, k) for k in names if getattr(cfg, k) is not None}
    return cae2.resolve_model_config(cfg.model, **overrides)


def make_optimizer(model: cae2.CAEv2, preset: TrainDefaults, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """The preset's AdamW (betas, eps; no decay on norms, biases and the preset's tokens), fused: one
    vectorised kernel per parameter on CPU and CUDA instead of ~6 elementwise ops each."""
    return torch.optim.AdamW(model.param_groups(weight_decay, preset.decay_tokens), lr=lr, betas=preset.betas,
                             eps=preset.eps, fused=True)


def preflight(cfg: TrainConfig) -> tuple[TargetStore, list, ModelConfig]:
    """Every check that can fail before the first step, in the order a user would fix them."""
    try:
        cae2.get_preset(cfg.model)
    except KeyError as e:
        raise UserError(f"--model: {e.args[0]}") from None
    shards = expand_shards(cfg.shards)
    store = TargetStore.open(cfg.targets)
    meta = store.meta
    model_cfg = _model_config(cfg)
    if meta.latent_dim != model_cfg.target_dim:
        raise UserError(f"--targets {cfg.targets}: teacher latents are {meta.latent_dim}-d but {cfg.model}'s head "
                        f"predicts {model_cfg.target_dim}-d; pass --target-dim {meta.latent_dim}, or use the preset "
                        "made for this teacher (CLIP ViT-L/14 -> cae2_vit_large)")
    if tuple(meta.grid) != model_cfg.grid_size:
        raise UserError(f"--targets {cfg.targets}: the teacher's patch grid is {meta.grid[0]}x{meta.grid[1]} but "
                        f"{cfg.model} has {model_cfg.grid_size[0]}x{model_cfg.grid_size[1]}; extract with a teacher "
                        "input size giving the student's grid (e.g. --teacher-image-size 196 for ViT-L-14)")
    if meta.teacher.get("random_init") and not cfg.allow_random_teacher:
        raise UserError(f"--targets {cfg.targets} was made with a RANDOMLY INITIALISED teacher; pass "
                        "--allow-random-teacher if that is intended (tests, demos)")
    index = index_shards(store, shards)
    return store, index, model_cfg


class Metrics:
    """metrics.jsonl (main process) + Accelerate trackers; on resume drops records past the checkpoint."""

    def __init__(self, run_dir: Path, accelerator, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=record["step"])


class _Preemption:
    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


@dataclass
class LogWindow:
    """Throughput and data waiting over the optimizer steps since the last metrics record."""

    t0: float = dataclasses.field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0

    def add(self, stats: StepStats) -> None:
        self.wait += stats.wait
        self.steps += 1

    def record(self, accelerator, stats: StepStats, step: int, epoch: int, global_batch: int) -> dict:
        """The metrics record of the last step (losses averaged over processes) and the window's rates."""
        reduced = accelerator.reduce(stats.losses, reduction="mean").tolist()
        elapsed = time.perf_counter() - self.t0
        return {"step": step, "epoch": epoch, "loss": reduced[0], "loss_v": reduced[1], "loss_z": reduced[2],
                "lr": stats.lr, "grad_norm": float(stats.grad_norm),
                "samples_per_s": self.steps * global_batch / elapsed, "data_wait_frac": min(1.0, self.wait / elapsed)}


@dataclass
class StepStats:
    losses: torch.Tensor
    """[loss, loss_v, loss_z] of this process, averaged over the step's micro-batches."""
    grad_norm: torch.Tensor
    lr: float
    wait: float
    """Seconds spent waiting for the data loader."""


@dataclass
class StepParts:
    """What one optimizer step needs."""

    accelerator: object
    model: torch.nn.Module
    forward: torch.nn.Module
    """The model, or its torch.compile wrapper."""
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    n_visible: int
    grad_accum: int
    teacher: torch.nn.Module | None = None
    """--teacher-online: targets from the teacher instead of the store."""
    student_views: DeviceViews | None = None
    teacher_views: DeviceViews | None = None
    keys_file: object = None

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A loader batch -> (normalised images, mask, targets) on the device."""
        device = self.accelerator.device
        raw = self.student_views.make_batch(batch["view_groups"], len(batch["keys"])) if self.student_views \
            else batch["images"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        if self.teacher is not None:
            return normalize(raw, IMAGENET_MEAN, IMAGENET_STD), mask, self.teacher(
                _teacher_views(batch, raw, self.teacher_views))
        targets = batch["targets"].to(device, non_blocking=True)
        if "target_scales" in batch:  # int8 store
            targets = dequantize(targets, batch["target_scales"].to(device, non_blocking=True))
        return normalize(raw, IMAGENET_MEAN, IMAGENET_STD), mask, targets


def train_step(parts: StepParts, batches, step: int, epoch: int) -> StepStats:
    """One optimizer step: `grad_accum` micro-batches (gradients synchronised on the last), clipping,
    the scheduled lr, the update."""
    acc = parts.accelerator
    losses = torch.zeros(3, device=acc.device)
    wait, keys = 0.0, []
    for micro in range(parts.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        images, mask, targets = parts.inputs(batch)
        with contextlib.nullcontext() if micro == parts.grad_accum - 1 else acc.no_sync(parts.model):
            pred = parts.forward(images, mask)
            out = cae2.alignment_loss(pred, cae2.CAEv2.arrange_targets(targets, mask), parts.n_visible,
                                      parts.schedule.loss, parts.schedule.loss_combine)
            acc.backward(out.loss / parts.grad_accum)
        losses += torch.stack([out.loss.detach(), out.loss_v.detach(), out.loss_z.detach()]).float()
        keys += batch["keys"]
        if parts.keys_file:
            parts.keys_file.write("".join(f"{step} {epoch} {k}\n" for k in batch["keys"]))
    grad_norm = acc.clip_grad_norm_(parts.model.parameters(), parts.schedule.clip_grad)
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
    return StepStats(losses / parts.grad_accum, grad_norm, lr, wait)


def train(cfg: TrainConfig, log=print) -> dict:
    run = start_run(cfg, log)
    acc, sched, total = run.accelerator, run.schedule, run.schedule.total_steps
    step, epoch, batch_in_epoch = run.step, run.epoch, run.batch_in_epoch
    metrics = Metrics(run.dir, acc, step)
    preempt = _Preemption()
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, unit="step", disable=not (cfg.progress and acc.is_main_process),
               dynamic_ncols=True)
    window, status, upcoming = LogWindow(), "finished", None  # upcoming: the next epoch's loader, started early
    run.parts.model.train()
    try:
        while step < total:
            it, plan = upcoming or run.start_epoch(epoch, batch_in_epoch)
            upcoming = None
            usable = (plan.batches_per_rank // cfg.grad_accum) * cfg.grad_accum
            while step < total and batch_in_epoch < usable:
                if upcoming is None and batch_in_epoch + cfg.grad_accum >= usable and step + 1 < total:
                    upcoming = run.start_epoch(epoch + 1, 0)  # its start-up overlaps this epoch's last step
                stats = train_step(run.parts, it, step, epoch)
                step, batch_in_epoch = step + 1, batch_in_epoch + cfg.grad_accum
                window.add(stats)
                if step % cfg.log_every == 0 or step == total:
                    record = window.record(acc, stats, step, epoch, sched.global_batch)
                    metrics.log(record)
                    bar.set_postfix_str(f"loss {record['loss']:.4f}, {record['samples_per_s']:.1f} samples/s")
                    window = LogWindow()
                bar.update(1)
                if run.knn is not None and step % cfg.eval_every == 0:
                    metrics.log({"step": step, "epoch": epoch, **run.knn.evaluate(run.parts.model)})
                stop = _agree(acc, preempt.requested)
                if run.checkpointer.should_save(step, total, stop):
                    position = (epoch + 1, 0) if batch_in_epoch >= usable else (epoch, batch_in_epoch)
                    run.checkpointer.save(acc, step, run.trainer_state(step, *position))
                if stop:
                    status = "preempted"
                    break
            del it
            if status == "preempted":
                break
            if batch_in_epoch >= usable:
                epoch, batch_in_epoch = epoch + 1, 0
    finally:
        del upcoming
        preempt.restore()
        bar.close()
        if run.parts.keys_file:
            run.parts.keys_file.close()
        acc.end_training()
        run.lock.release()
    return {"status": status, "step": step, "run_dir": str(run.dir), "total_steps": total}


@dataclass
class Run:
    """A pretraining run, set up and (when resumed) restored: everything `train` loops over."""

    cfg: TrainConfig
    dir: Path
    accelerator: object
    store: TargetStore
    index: list
    model_cfg: ModelConfig
    stream_cfg: StreamConfig
    schedule: Schedule
    parts: StepParts
    checkpointer: Checkpointer
    resolved: dict
    data_layout: dict
    knn: KnnMonitor | None = None
    lock: RunLock | None = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def start_epoch(self, epoch: int, skip: int):
        """Start an epoch's loader (its workers begin decoding at once) -> (iterator, plan)."""
        loader, plan = make_loader(self.store.path, self.store.meta, self.index, self.stream_cfg, self.model_cfg,
                                   epoch, skip_batches=skip, pin_memory=self.accelerator.device.type == "cuda")
        return start_loader(loader), plan

    def trainer_state(self, step: int, epoch: int, batch_in_epoch: int) -> dict:
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "model": self.cfg.model,
                "model_config": self.resolved["model"], "data_layout": self.data_layout,
                "config": self.resolved["config"]}


def start_run(cfg: TrainConfig, log=print) -> Run:
    """Preflight, Accelerate, the schedule, the model and optimizer, the resume; RUN_DIR is written only
    after every check has passed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    run_dir = Path(cfg.out)
    store, index, model_cfg = preflight(cfg)
    checkpointer = Checkpointer(run_dir, cfg.save_every, cfg.keep_last)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # gloo ranks when launched on CPUs
                              mixed_precision=cfg.mixed_precision, log_with="tensorboard",
                              project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)))
    lock = RunLock.take(run_dir, accelerator)
    try:
        return _start_run(cfg, log, run_dir, store, index, model_cfg, checkpointer, accelerator, lock)
    except BaseException:
        lock.release()
        raise


def _start_run(cfg, log, run_dir, store, index, model_cfg, checkpointer, accelerator, lock) -> Run:
    from accelerate.utils import set_seed

    meta = store.meta
    ckpt, resume_state = checkpointer.find(cfg.resume)
    world, rank = accelerator.num_processes, accelerator.process_index
    view_path = _view_path(cfg.view_path, accelerator.device, meta)
    stream_cfg = StreamConfig(batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world, workers=cfg.workers,
                              shuffle_buffer=cfg.shuffle_buffer, student_size=model_cfg.img_size,
                              teacher_views=cfg.teacher_online, view_path=view_path,
                              corrupt_targets=cfg.corrupt_targets)
    preset = cae2.get_preset(cfg.model).train
    first_plan = plan_epoch(index, stream_cfg, 0)
    schedule = Schedule.resolve(cfg, preset, first_plan.batches_per_rank, world)
    resolved = {
        "config": {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(cfg).items()},
        "model": {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(model_cfg).items()},
        "derived": schedule.to_json(),
        "store": {"path": store.path, "teacher": meta.teacher, "views_per_image": meta.views_per_image,
                  "latent_format": meta.latent_format},
        "git_sha": _git_sha(), "cae2_version": cae2.__version__,
    }
    if accelerator.is_main_process:
        _log_start(log, cfg, accelerator, schedule, meta, index, first_plan, view_path)

    set_seed(cfg.seed)  # the same initial weights on every process
    model = cae2.CAEv2(model_cfg)
    optimizer = make_optimizer(model, preset, schedule.weight_decay, schedule.peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = StepParts(accelerator=accelerator, model=model, forward=model, optimizer=optimizer, schedule=schedule,
                      n_visible=model_cfg.num_visible_tokens, grad_accum=cfg.grad_accum)
    if cfg.teacher_online:
        parts.teacher = teacher_for_store(meta.teacher, meta.input_size, accelerator.device, compile=cfg.compile)
    if view_path == "device":
        parts.student_views = DeviceViews(model_cfg.img_size, stream_cfg.student_interpolation, accelerator.device)
        parts.teacher_views = DeviceViews(meta.input_size, meta.interpolation, accelerator.device)
    data_layout = {"processes": world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                   "workers": max(cfg.workers, 1), "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer,
                   "shards_sha256": hashlib.sha256("\n".join(i.shard.name for i in index).encode()).hexdigest()}
    run = Run(cfg=cfg, dir=run_dir, accelerator=accelerator, store=store, index=index, model_cfg=model_cfg,
              stream_cfg=stream_cfg, schedule=schedule, parts=parts, checkpointer=checkpointer, resolved=resolved,
              data_layout=data_layout, lock=lock)
    if ckpt is not None:
        ckpt, resume_state = checkpointer.restore(
            accelerator, cfg.resume, ckpt, resume_state,
            lambda c, s: _check_resume(c, s, resolved["model"], data_layout), log=log)
        run.step, run.epoch, run.batch_in_epoch = (resume_state[k] for k in ("step", "epoch", "batch_in_epoch"))
        if accelerator.is_main_process:
            log(f"resumed from {ckpt} at step {run.step} (epoch {run.epoch}, micro-batch {run.batch_in_epoch})")
    else:
        set_seed(cfg.seed, device_specific=True)  # per-process streams (drop path); a resume restores them
    # Compiled after prepare/load: checkpoints hold the plain module's keys, so runs with and without
    # --compile resume each other's checkpoints.
    parts.forward = torch.compile(model) if cfg.compile else model
    if accelerator.is_main_process:  # every check has passed: only now is RUN_DIR written
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=1, default=str))
        accelerator.init_trackers("tensorboard", config=resolved["derived"])
    if cfg.log_keys:
        (run_dir / "keys").mkdir(parents=True, exist_ok=True)
        parts.keys_file = (run_dir / "keys" / f"rank{rank}.txt").open("a")
    if cfg.eval_every:
        run.knn = KnnMonitor(cfg.eval_data, model_cfg, accelerator)
    return run


class RunLock:
    """One training process (job) per run directory: the main process claims `.<RUN_DIR>.train.claim`
    beside it (targets.claims; a dead or silent holder's claim is taken over), and every rank agrees."""

    def __init__(self, path: Path | None, holder: Holder | None, heartbeat: Heartbeat | None):
        self.path, self.holder, self.heartbeat = path, holder, heartbeat

    @classmethod
    def take(cls, run_dir: Path, accelerator) -> RunLock:
        path = run_dir.resolve().parent / f".{run_dir.name}.train.claim"
        ok, other = True, None
        if accelerator.is_main_process:
            holder = Holder.me()
            ok, other = try_claim(path, holder)
        if not _agree(accelerator, not ok):
            if not accelerator.is_main_process:
                return cls(None, None, None)
            heartbeat = Heartbeat()
            heartbeat.add(path)
            return cls(path, holder, heartbeat)
        who = other.describe() if other else "a process that is starting"
        raise UserError(f"--out {run_dir}: {who} is training in it ({path}); wait for it to finish, or use another "
                        "--out")

    def release(self) -> None:
        if self.path is not None:
            self.heartbeat.stop()
            release(self.path, self.holder)
            self.path = None


class KnnMonitor:
    """k-NN top-1/top-5 (k = 20) of the student's CLS features during pretraining. The main process
    extracts and classifies while the others wait; nothing here uses a random generator or changes the
    model's state, so the run and its resumes go on exactly as without it."""

    def __init__(self, folder: str, model_cfg: ModelConfig, accelerator):
        from pathlib import Path

        from pipelines.eval_data import load_labelled

        root = Path(folder)
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise UserError(f"--eval-data {folder}: expected train/ and val/ folders (ImageFolder layout)")
        self.train = load_labelled(str(root / "train"), "--eval-data train/")
        self.val = load_labelled(str(root / "val"), "--eval-data val/", classes=self.train.classes)
        self.model_cfg, self.accelerator = model_cfg, accelerator

    def evaluate(self, model) -> dict:
        from pipelines.evaluate import student_knn

        acc = self.accelerator
        record = {}
        if acc.is_main_process:
            top1, top5 = student_knn(acc.unwrap_model(model), self.train, self.val, 20, acc.device)
            record = {"knn_top1": top1, "knn_top5": top5, "knn_k": 20}
        acc.wait_for_everyone()
        return record


def _log_start(log, cfg: TrainConfig, accelerator, schedule: Schedule, meta: StoreMeta, index: list, plan,
               view_path: str) -> None:
    s = schedule
    log(f"pretrain: {cfg.model} on {s.processes} process(es) ({accelerator.device}, {accelerator.mixed_precision}); "
        f"global batch {s.global_batch} = {cfg.batch_size} x {s.processes} x {cfg.grad_accum}; peak lr "
        f"{s.peak_lr:.3g} ({s.lr_rule}); {s.total_steps} steps, {s.steps_per_epoch}/epoch, warmup {s.warmup_steps}; "
        f"targets {'ONLINE teacher' if cfg.teacher_online else f'cache ({meta.latent_format})'}")
    log(f"views: cut {where_views_are_cut(view_path, accelerator.device)}; the store's were cut "
        f"{where_views_are_cut(meta.view_path, 'the teacher device')} from {meta.decoder}-decoded images"
        + ("" if view_path == meta.view_path else " (the two paths give bit-identical views)"))
    skipped = sum(i.num_samples - len(i.rows) for i in index)
    log(f"data: {len(index)} shards, {sum(len(i.rows) for i in index)} samples ({skipped} skipped by stage 1), "
        f"{plan.left_out} left out per epoch to keep {s.processes} rank(s) in step")


def _view_path(choice: str, device: torch.device, meta: StoreMeta) -> str:
    """The view path of this run; views must come from the decoder the store's views came from."""
    if meta.decoder not in DECODERS:
        raise UserError(f"--targets: the store's views were cut from images decoded by {meta.decoder!r}; this "
                        f"cae2 decodes with {', '.join(DECODERS)}: use the cae2 version that made the store")
    return resolve_view_path(choice, device, meta.interpolation, ViewSettings.from_dict(meta.views))


def _teacher_views(batch: dict, student: torch.Tensor, views: DeviceViews | None) -> torch.Tensor:
    """The teacher's view of each sample (--teacher-online): the student's when sizes match."""
    if "teacher_images" in batch:
        return batch["teacher_images"]
    if "teacher_view_groups" in batch:
        return views.make_batch(batch["teacher_view_groups"], len(batch["keys"]))
    return student


def _check_resume(ckpt: Path, state: dict, model: dict, data_layout: dict) -> None:
    """The data position means something only under the same data layout; the weights only fit the same model."""
    if state.get("model_config") != model:
        diff = sorted(k for k in model if state.get("model_config", {}).get(k) != model[k])
        raise UserError(f"--resume {ckpt}: the checkpoint is for another model configuration ({', '.join(diff)} "
                        "differ); resume with the original --model and options, or start a new --out")
    saved = state.get("data_layout", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in data_layout.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"--resume {ckpt}: the data layout changed ({'; '.join(diff)}); the saved position in the "
                        "epoch only holds for the same shards, processes, batch size, grad accumulation, workers, "
                        "seed and shuffle buffer")


def _agree(accelerator, flag: bool) -> bool:
    """True on every process if any process was asked to stop (SIGTERM)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
