"""Stage 2: CAE v2 pretraining on cached CLIP targets, under Accelerate, resumable.

    preflight checks (store vs shards vs model; before anything is written)      run.py
    -> model, AdamW param groups, Accelerator.prepare (never the WebDataset loader)
    -> per optimizer step: `grad_accum` micro-batches -> clip -> lr (warmup + cosine) -> step    step.py
    -> metrics.jsonl + TensorBoard, checkpoints every `save_every` steps, at the end and on SIGTERM
       (pipelines.run_loop, the skeleton every resumable loop shares)
"""

from __future__ import annotations

import functools

from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.run import Evaluator, Run, start_run
from pipelines.pretrain.step import LogWindow, train_step
from pipelines.run_loop import RunLoop


def train(cfg: TrainConfig, evaluator: Evaluator | None = None) -> RunLoop:
    """Pretrain (or resume) the run `cfg` describes -> its loop: `status` (finished | preempted (SIGTERM) |
    interrupted (Ctrl-C)), `step`, `status_line()`. `evaluator` measures the student every `cfg.eval_every`
    steps."""
    if cfg.eval_every and evaluator is None:
        raise ValueError("--eval-every needs an evaluator (pipelines.evaluate.monitor.KnnMonitor)")
    run = start_run(cfg, evaluator)
    loop = RunLoop(run.accelerator, run.checkpointer, run.checkpoint_parts(), step=run.step,
                   total=run.schedule.total_steps, name="pretrain", progress=cfg.progress, lock=run.lock)
    try:
        with loop:
            _epochs(run, loop)
    finally:
        if run.parts.keys_file:
            run.parts.keys_file.close()
    return loop


def _epochs(run: Run, loop: RunLoop) -> None:
    """Epochs of optimizer steps until the run's total, or until a stop signal (checkpoint saved)."""
    cfg, acc, total = run.cfg, run.accelerator, run.schedule.total_steps
    step, epoch, batch_in_epoch = run.step, run.epoch, run.batch_in_epoch
    window, upcoming = LogWindow(), None  # upcoming: the next epoch's loader, started early
    run.parts.model.train()
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
            record = None
            if step % cfg.log_every == 0 or step == total:
                record = window.record(acc, stats, step, epoch, run.schedule.global_batch)
                window = LogWindow()
            loop.step_done(step, record, f"loss {record['loss']:.4f}, {record['samples_per_s']:.1f} samples/s"
                           if record else None)
            if run.parts.snapshots is not None and run.parts.snapshots.due(step):
                tensorboard = acc.get_tracker("tensorboard", unwrap=True)
                run.parts.snapshots.write(acc.unwrap_model(run.parts.model), tensorboard, step)
            if run.evaluator is not None and step % cfg.eval_every == 0:
                loop.log({"step": step, "epoch": epoch, **run.evaluator(run.parts.model, acc)})
            position = (epoch + 1, 0) if batch_in_epoch >= usable else (epoch, batch_in_epoch)
            if loop.checkpoint(functools.partial(run.trainer_state, step, *position)):
                return
        del it
        if batch_in_epoch >= usable:
            epoch, batch_in_epoch = epoch + 1, 0
