"""Setting up a pretraining run: every check before anything is written, then Accelerate, the schedule,
the model and optimizer, and (when resumed) the restored state. RUN_DIR is written only after every
check has passed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import cae2
from cae2.config import ModelConfig
from cae2.errors import UserError
from pipelines.checkpoint import Checkpointer, CheckpointParts
from pipelines.files import write_atomically
from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.data import (
    EpochPlan,
    ShardIndex,
    StreamConfig,
    index_shards,
    make_loader,
    plan_epoch,
    start_loader,
)
from pipelines.pretrain.schedule import Schedule
from pipelines.pretrain.snapshots import Snapshots, image_every
from pipelines.pretrain.step import StepParts, make_optimizer
from pipelines.run_dirs import RunDir
from pipelines.run_loop import restore, start_accelerator
from pipelines.runs import RunLock, git_sha
from pipelines.shards import expand_shards
from targets.decoders import DECODERS, DecoderUse, resolve_decoder
from targets.device_views import DeviceViews
from targets.storage import inside
from targets.store import TargetStore
from targets.store_meta import StoreMeta
from targets.teacher import teacher_for_store
from targets.view_paths import resolve_view_path, where_views_are_cut
from targets.views import ViewSettings

logger = logging.getLogger(__name__)
Evaluator = Callable[[torch.nn.Module, Accelerator], dict]
"""(the student, the accelerator) -> metrics of the student (`--eval-every`); it must not touch the
student's state or any random generator, so that the run goes on exactly as without it."""


@dataclass
class Run:
    """A pretraining run, set up and (when resumed) restored: everything `train` loops over."""

    cfg: TrainConfig
    dir: Path
    accelerator: Accelerator
    store: TargetStore
    index: list
    model_cfg: ModelConfig
    stream_cfg: StreamConfig
    schedule: Schedule
    parts: StepParts
    checkpointer: Checkpointer
    resolved: dict
    data_layout: dict
    evaluator: Evaluator | None = None
    lock: RunLock | None = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def start_epoch(self, epoch: int, skip: int):
        """Start an epoch's loader (its workers begin decoding at once) -> (iterator, plan)."""
        loader, plan = make_loader(self.store.path, self.store.meta, self.index, self.stream_cfg, self.model_cfg,
                                   epoch, skip_batches=skip, pin_memory=self.accelerator.device.type == "cuda")
        return start_loader(loader), plan

    def checkpoint_parts(self) -> CheckpointParts:
        return CheckpointParts(model=self.parts.model, optimizer=self.parts.optimizer)

    def trainer_state(self, step: int, epoch: int, batch_in_epoch: int) -> dict:
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "model": self.cfg.model,
                "model_config": self.resolved["model"], "data_layout": self.data_layout,
                "config": self.resolved["config"]}


def model_config(cfg: TrainConfig) -> ModelConfig:
    names = ("drop_path", "mask_strategy", "target_dim")
    overrides = {k: getattr(cfg, k) for k in names if getattr(cfg, k) is not None}
    return cae2.resolve_model_config(cfg.model, **overrides)


def preflight(cfg: TrainConfig) -> tuple[TargetStore, list, ModelConfig]:
    """Every check that can fail before the first step, in the order a user would fix them."""
    try:
        cae2.get_preset(cfg.model)
    except KeyError as e:
        raise UserError(f"--model: {e.args[0]}") from None
    shards = expand_shards(cfg.shards)
    store = TargetStore.open(cfg.targets)
    meta = store.meta
    model_cfg = model_config(cfg)
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
    _check_run_dir(RunDir(cfg.out), cfg.targets)
    index = index_shards(store, shards)
    return store, index, model_cfg


RUN_FILES = {"config.json", "metrics.jsonl", "checkpoints", "tensorboard", "keys"}


def _check_run_dir(out: RunDir, store: str) -> None:
    """--out is a new, empty or earlier cae2 run directory: never the store, never a folder of other files."""
    if inside(out.location.url, store):
        raise UserError(f"--out {out} and --targets {store} overlap; write the run outside the target store")
    others = out.holds_other_files(RUN_FILES)
    if others:
        raise UserError(f"--out {out} holds files that are not a cae2 run (e.g. {others[0]}); choose a new or "
                        "empty directory")


def start_run(cfg: TrainConfig, evaluator: Evaluator | None = None) -> Run:
    """Preflight, Accelerate, the schedule, the model and optimizer, the resume; RUN_DIR is written only
    after every check has passed."""
    run_dir = RunDir(cfg.out)
    store, index, model_cfg = preflight(cfg)
    checkpointer = Checkpointer(run_dir, cfg.save_every, cfg.keep_last)
    accelerator = start_accelerator(run_dir.local, cfg.mixed_precision, cfg.grad_accum)
    lock = RunLock.take(run_dir, accelerator)
    try:
        found = checkpointer.find(cfg.resume)  # before anything is logged: a refusal comes first
        run = _assemble(Setup(cfg, run_dir, store, index, model_cfg, checkpointer, accelerator))
        run.lock, run.evaluator = lock, evaluator
        _resume(run, found)
        _open_run_dir(run)
        return run
    except BaseException:
        lock.release()
        raise


@dataclass(frozen=True)
class Setup:
    """What preflight and Accelerate gave, before the model exists."""

    cfg: TrainConfig
    run_dir: RunDir
    store: TargetStore
    index: list[ShardIndex]
    model_cfg: ModelConfig
    checkpointer: Checkpointer
    accelerator: Accelerator


def _assemble(setup: Setup) -> Run:
    """Everything but the restored state: stream, schedule, model, optimizer, the step's parts."""
    cfg, store, index, model_cfg, accelerator = setup.cfg, setup.store, setup.index, setup.model_cfg, setup.accelerator
    meta = store.meta
    world, rank = accelerator.num_processes, accelerator.process_index
    view_path, decoder = _view_path(cfg, accelerator.device, meta)
    stream_cfg = StreamConfig(batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world, workers=cfg.workers,
                              shuffle_buffer=cfg.shuffle_buffer, student_size=model_cfg.img_size,
                              teacher_views=cfg.teacher_online, view_path=view_path,
                              corrupt_targets=cfg.corrupt_targets, device_decode=decoder.on_device)
    preset = cae2.get_preset(cfg.model).train
    first_plan = plan_epoch(index, stream_cfg, 0)
    schedule = Schedule.resolve(cfg, preset, first_plan.batches_per_rank, world)
    if accelerator.is_main_process:
        _log_start(cfg, accelerator, schedule, meta, index, first_plan, view_path, decoder)
    set_seed(cfg.seed)  # the same initial weights on every process
    model = cae2.CAEv2(model_cfg)
    optimizer = make_optimizer(model, preset, schedule.weight_decay, schedule.peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = StepParts(accelerator=accelerator, model=model, forward=model, optimizer=optimizer, schedule=schedule,
                      n_visible=model_cfg.num_visible_tokens)
    every = image_every(cfg.image_every, schedule.total_steps)
    if every and accelerator.is_main_process:
        parts.snapshots = Snapshots(every, model_cfg.grid_size, model_cfg.num_visible_tokens)
    if cfg.teacher_online:
        parts.teacher = teacher_for_store(meta.teacher, meta.input_size, accelerator.device, compile=cfg.compile)
    if view_path == "device":
        parts.student_views = DeviceViews(model_cfg.img_size, stream_cfg.student_interpolation, accelerator.device)
        parts.teacher_views = DeviceViews(meta.input_size, meta.interpolation, accelerator.device)
    return Run(cfg=cfg, dir=setup.run_dir.local, accelerator=accelerator, store=store, index=index, model_cfg=model_cfg,
               stream_cfg=stream_cfg, schedule=schedule, parts=parts, checkpointer=setup.checkpointer,
               resolved=_resolved(cfg, model_cfg, schedule, store), data_layout=_data_layout(cfg, world, index, meta))


def _resolved(cfg: TrainConfig, model_cfg: ModelConfig, schedule: Schedule, store: TargetStore) -> dict:
    """RUN_DIR/config.json: the options, the model, what they resolved to, the store, the code."""
    meta = store.meta
    return {
        "config": {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(cfg).items()},
        "model": {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(model_cfg).items()},
        "derived": schedule.to_json(),
        "store": {"path": store.path, "teacher": meta.teacher, "views_per_image": meta.views_per_image,
                  "latent_format": meta.latent_format},
        "git_sha": git_sha(), "cae2_version": cae2.__version__,
    }


def _data_layout(cfg: TrainConfig, world: int, index: list[ShardIndex], meta: StoreMeta) -> dict:
    """What the saved position in an epoch and the targets mean something under: a resume must have the same
    (the target store's identity: teacher, views, seed, K, format; not its place, so a moved copy resumes)."""
    return {"processes": world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "workers": max(cfg.workers, 1), "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer,
            "shards_sha256": hashlib.sha256("\n".join(i.shard.name for i in index).encode()).hexdigest(),
            "targets": meta.identity()}


def _resume(run: Run, found: tuple[Path | None, dict | None]) -> None:
    """Restore the checkpoint `Checkpointer.find` chose, or seed a fresh run's per-process streams."""
    if found[0] is None:
        set_seed(run.cfg.seed, device_specific=True)  # per-process streams (drop path); a resume restores them
        return
    state = restore(run.checkpointer, run.accelerator, run.cfg.resume, found,
                    lambda c, s: _check_resume(c, s, run.resolved["model"], run.data_layout), run.checkpoint_parts())
    assert state is not None
    run.step, run.epoch, run.batch_in_epoch = (state[k] for k in ("step", "epoch", "batch_in_epoch"))


def _open_run_dir(run: Run) -> None:
    """Compile, then write RUN_DIR: config.json, TensorBoard, the key audit files."""
    cfg, accelerator = run.cfg, run.accelerator
    # Compiled after prepare/load: checkpoints hold the plain module's keys, so runs with and without
    # --compile resume each other's checkpoints.
    run.parts.forward = torch.compile(run.parts.model, mode=cfg.compile_mode) if cfg.compile else run.parts.model
    if accelerator.is_main_process:  # every check has passed: only now is RUN_DIR written
        run.dir.mkdir(parents=True, exist_ok=True)
        record = run.resolved | {"segments": _segments(run.dir / "config.json", run.resolved, run.step)}
        write_atomically(run.dir / "config.json", json.dumps(record, indent=1, default=str))
        run.checkpointer.run.push()  # an object-store run: config.json there from the start
        accelerator.init_trackers("tensorboard", config=run.resolved["derived"])
    if cfg.log_keys:
        (run.dir / "keys").mkdir(parents=True, exist_ok=True)
        run.parts.keys_file = (run.dir / "keys" / f"rank{accelerator.process_index}.txt").open("a")


UNRECORDED = ("resume", "progress")
"""Options that change nothing about the steps a segment trains."""


def _segments(path: Path, resolved: dict, step: int) -> list[dict]:
    """config.json's history: the first segment's options whole, then, for each resume that changed options
    (a new --lr, --steps, ...), the step it resumed at and what changed; a resume changes nothing silently."""
    new = {k: v for k, v in json.loads(json.dumps(resolved["config"], default=str)).items() if k not in UNRECORDED}
    try:
        before = json.loads(path.read_text()) if step > 0 else None
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict) or "config" not in before:
        return [{"from_step": step, "config": new}]
    segments = before.get("segments") or [{"from_step": 0, "config": before["config"]}]
    old = {k: v for k, v in before["config"].items() if k not in UNRECORDED}
    changed = {k: {"was": old.get(k), "now": v} for k, v in new.items() if old.get(k) != v}
    if changed:
        said = ", ".join(f"{k}: {c['was']} -> {c['now']}" for k, c in changed.items())
        logger.warning(f"resuming at step {step} with changed options ({said}); config.json records them as a new "
                       "segment")
        segments = [*segments, {"from_step": step, "changed": changed}]
    return segments


def _log_start(cfg: TrainConfig, accelerator: Accelerator, schedule: Schedule, meta: StoreMeta,
               index: list[ShardIndex], plan: EpochPlan, view_path: str, decoder: DecoderUse) -> None:
    s = schedule
    logger.info(
        f"pretrain: {cfg.model} on {s.processes} process(es) ({accelerator.device}, {accelerator.mixed_precision}); "
        f"global batch {s.global_batch} = {cfg.batch_size} x {s.processes} x {cfg.grad_accum}; peak lr "
        f"{s.peak_lr:.3g} ({s.lr_rule}); {s.total_steps} steps, {s.steps_per_epoch}/epoch, warmup {s.warmup_steps}; "
        f"targets {'ONLINE teacher' if cfg.teacher_online else f'cache ({meta.latent_format})'}")
    logger.info(f"views: cut {where_views_are_cut(view_path, accelerator.device)}; the store's were cut "
        f"{where_views_are_cut(meta.view_path, 'the teacher device')} from {meta.decoder}-decoded images"
        + ("" if view_path == meta.view_path else " (the two paths give bit-identical views)")
        + f"; this run decodes with {decoder.name}{' on the device' if decoder.on_device else ''}")
    if decoder.crossing:
        logger.warning(decoder.crossing)
    skipped = sum(i.num_samples - len(i.rows) for i in index)
    logger.info(f"data: {len(index)} shards, {sum(len(i.rows) for i in index)} samples ({skipped} skipped by stage 1), "
        f"{plan.left_out} left out per epoch to keep {s.processes} rank(s) in step")


def _view_path(cfg: TrainConfig, device: torch.device, meta: StoreMeta) -> tuple[str, DecoderUse]:
    """The view path of this run, and its decoder: views come from the decoder the store's views came from
    unless --decoder says otherwise."""
    if meta.decoder not in DECODERS:
        raise UserError(f"--targets: the store's views were cut from images decoded by {meta.decoder!r}; this "
                        f"cae2 decodes with {', '.join(DECODERS)}: use the cae2 version that made the store")
    view_path = resolve_view_path(cfg.view_path, device, meta.interpolation, ViewSettings.from_dict(meta.views))
    return view_path, resolve_decoder(cfg.decoder, meta.decoder, device, view_path)


def _check_resume(ckpt: Path, state: dict, model: dict, data_layout: dict) -> None:
    """The data position means something only under the same data layout; the weights only fit the same model."""
    if state.get("model_config") != model:
        diff = sorted(k for k in model if state.get("model_config", {}).get(k) != model[k])
        raise UserError(f"--resume {ckpt}: the checkpoint is for another model configuration ({', '.join(diff)} "
                        "differ); resume with the original --model and options, or start a new --out")
    saved = state.get("data_layout", {})
    if "targets" in saved and saved["targets"] != data_layout["targets"]:
        was, now = saved["targets"], data_layout["targets"]
        diff = [f"{k}: checkpoint {was.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(was) | set(now))
                if was.get(k) != now.get(k)]
        raise UserError(f"--resume {ckpt}: --targets is another target store ({'; '.join(diff)}); the run's "
                        "steps so far trained on the first: resume with it, or start a new --out")
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in data_layout.items()
            if k != "targets" and k in saved and saved.get(k) != v]
    if diff:
        raise UserError(f"--resume {ckpt}: the data layout changed ({'; '.join(diff)}); the saved position in the "
                        "epoch only holds for the same shards, processes, batch size, grad accumulation, workers, "
                        "seed and shuffle buffer")
