"""Stage 2: CAE v2 pretraining on cached CLIP targets, under Accelerate, resumable.

    preflight checks (store vs shards vs model; before anything is written)      run.py
    -> model, AdamW param groups, Accelerator.prepare (never the WebDataset loader)
    -> per optimizer step: `grad_accum` micro-batches -> clip -> lr (warmup + cosine) -> step    step.py
    -> metrics.jsonl + TensorBoard, checkpoints every `save_every` steps, at the end and on SIGTERM
"""

from __future__ import annotations

import contextlib

from tqdm import tqdm

from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.run import Evaluator, start_run
from pipelines.pretrain.step import LogWindow, train_step
from pipelines.runs import MetricsLog, Preemption, agree


def train(cfg: TrainConfig, log=print, evaluator: Evaluator | None = None) -> dict:
    """Pretrain (or resume) the run `cfg` describes -> {status: finished | preempted (SIGTERM) | interrupted
    (Ctrl-C), step, run_dir, total_steps}. `evaluator` measures the student every `cfg.eval_every` steps."""
    if cfg.eval_every and evaluator is None:
        raise ValueError("--eval-every needs an evaluator (pipelines.evaluate.monitor.KnnMonitor)")
    run = start_run(cfg, log, evaluator)
    acc, total = run.accelerator, run.schedule.total_steps
    step, epoch, batch_in_epoch = run.step, run.epoch, run.batch_in_epoch
    metrics = MetricsLog(run.dir, acc, step)
    preempt = Preemption()
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
                    record = window.record(acc, stats, step, epoch, run.schedule.global_batch)
                    metrics.log(record)
                    bar.set_postfix_str(f"loss {record['loss']:.4f}, {record['samples_per_s']:.1f} samples/s")
                    window = LogWindow()
                bar.update(1)
                if run.evaluator is not None and step % cfg.eval_every == 0:
                    metrics.log({"step": step, "epoch": epoch, **run.evaluator(run.parts.model, acc)})
                stop = agree(acc, preempt.requested)
                if run.checkpointer.should_save(step, total, stop):
                    position = (epoch + 1, 0) if batch_in_epoch >= usable else (epoch, batch_in_epoch)
                    run.checkpointer.save(acc, step, run.trainer_state(step, *position))
                if stop:
                    status = "interrupted" if preempt.signal == "SIGINT" else "preempted"
                    break
            del it
            if status != "finished":
                break
            if batch_in_epoch >= usable:
                epoch, batch_in_epoch = epoch + 1, 0
    except BaseException:
        with contextlib.suppress(OSError):  # the error in flight is the one to report
            metrics.close()
        raise
    else:
        metrics.close()
    finally:
        del upcoming
        preempt.restore()
        bar.close()
        if run.parts.keys_file:
            run.parts.keys_file.close()
        run.lock.release()
    return {"status": status, "step": step, "run_dir": str(run.dir), "total_steps": total}
