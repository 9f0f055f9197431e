"""The skeleton every resumable training loop runs in (`pretrain`, `evaluate finetune`, the official linear
probe), so that a fix to start-up, shutdown or resume lands once:

    accelerator = start_accelerator(run_dir, ...)          Accelerate with TensorBoard in RUN_DIR
    lock = RunLock.take(run_dir, accelerator)               one job per run dir
    found = checkpointer.find(cfg.resume)                   the checkpoint to resume from, if any
    ... the loop's own set-up; restore(...) loads `found` into its parts
    with RunLoop(...) as loop:                              metrics log, SIGTERM/Ctrl-C, progress, the lock
        while loop.step < total:
            ... one optimizer step ...
            loop.step_done(step, record)                     metrics.jsonl + TensorBoard, progress
            if loop.checkpoint(trainer_state):               saved when due or when stopping
                break                                        SIGTERM or Ctrl-C on any rank: saved, stop
    loop.status, loop.status_line()                         finished | preempted | interrupted
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from cae2.errors import UserError
from pipelines.checkpoint import Checkpointer, CheckpointParts
from pipelines.logs import Progress
from pipelines.run_dirs import shown
from pipelines.runs import MetricsLog, Preemption, RunLock

logger = logging.getLogger(__name__)


def start_accelerator(run_dir: Path, mixed_precision: str | None, grad_accum: int = 1) -> Accelerator:
    """Accelerate for a run in RUN_DIR: gloo ranks when no GPU is visible, TensorBoard logs in RUN_DIR, and
    `grad_accum` micro-batches per optimizer step (`accelerator.accumulate`; a loop whose accumulation
    depends on the process count sets `accelerator.gradient_accumulation_steps` once it knows).
    mixed_precision None: the launch configuration's."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                       gradient_accumulation_steps=grad_accum, log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)))


def reduce(accelerator: Accelerator, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """`accelerator.reduce` of one tensor over the ranks (Accelerate types it for nested structures)."""
    return cast(torch.Tensor, accelerator.reduce(tensor, reduction=reduction))


def restore(checkpointer: Checkpointer, accelerator: Accelerator, resume: str | None,
            found: tuple[Path | None, dict | None], check: Callable[[Path, dict], None],
            parts: CheckpointParts) -> dict | None:
    """Load the checkpoint `Checkpointer.find` chose into `parts` after check(checkpoint, its state) -> its
    trainer state, or None for a fresh run; the log says where the run goes on from."""
    ckpt, state = found
    if ckpt is None:
        return None
    ckpt, state = checkpointer.restore(accelerator, resume, ckpt, state or {}, check, parts)
    if accelerator.is_main_process:
        checkpointer.run.pull()  # an object-store run: its metrics and TensorBoard files, to go on from
    where = ", ".join(f"{k.replace('_', ' ')} {state[k]}" for k in ("epoch", "batch_in_epoch", "position")
                      if k in state)
    logger.info(f"resumed from {shown(ckpt)} at step {state['step']} ({where})")
    return state


class RunLoop:
    """One run of a loop: its metrics log (records past the resumed step dropped), the stop signals (SIGTERM,
    Ctrl-C: save and stop after the step), progress, checkpoints when due, and the run lock, released at
    the end however the loop ends."""

    def __init__(self, accelerator: Accelerator, checkpointer: Checkpointer, parts: CheckpointParts,
                 *, step: int, total: int, name: str, progress: bool = True, lock: RunLock | None = None):
        self.acc, self.checkpointer, self.parts = accelerator, checkpointer, parts
        self.run_dir = checkpointer.run_dir
        self.step, self.total, self.name, self.show_progress, self.lock = step, total, name, progress, lock
        self.status = "finished"

    def __enter__(self) -> RunLoop:
        try:
            self.metrics = MetricsLog(self.run_dir, self.acc, self.step)
        except BaseException:
            self._release()
            raise
        self.preemption = Preemption()
        self.progress = Progress(self.total, initial=self.step, enabled=self.show_progress and self.acc.is_main_process,
                                 name=self.name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is None:
                self.metrics.close()
                if self.acc.is_main_process:
                    self.checkpointer.run.push()  # an object-store run: its metrics as they end
            else:
                with contextlib.suppress(OSError, UserError):  # the error in flight is the one to report
                    self.metrics.close()
                    if self.acc.is_main_process:
                        self.checkpointer.run.push()
        finally:
            self.preemption.restore()
            self.progress.close()
            self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def log(self, record: dict) -> None:
        """A metrics record: RUN_DIR/metrics.jsonl (main process) and TensorBoard."""
        self.metrics.log(record)

    def step_done(self, step: int, record: dict | None = None, note: str | None = None) -> None:
        """After an optimizer step: its metrics record, if it has one, and the progress (with `note`)."""
        self.step = step
        if record is not None:
            self.metrics.log(record)
        self.progress.update(1, note)

    def stopping(self) -> bool:
        """True on every rank once any rank got SIGTERM or Ctrl-C (one all-reduce when there are several)."""
        if self.acc.num_processes == 1:
            return self.preemption.requested
        if self.preemption.requested:
            self.acc.set_trigger()
        return self.acc.check_trigger()

    def checkpoint(self, trainer_state: Callable[[], dict], due: bool = False) -> bool:
        """Save a checkpoint when one is due (every `save_every` steps, the last step, or `due`) or when the
        run is stopping -> True: stop now (the checkpoint is saved)."""
        stop = self.stopping()
        if due or self.checkpointer.should_save(self.step, self.total, stop):
            self.checkpointer.save(self.acc, self.step, trainer_state(), self.parts)
        if stop:
            self.status = "interrupted" if self.preemption.signal == "SIGINT" else "preempted"
        return stop

    def status_line(self) -> str:
        """What the command says at the end (stdout)."""
        if self.status == "finished":
            return f"finished {self.step} steps; run dir: {self.checkpointer.run}"
        return f"{self.status} at step {self.step}: checkpoint saved; rerun with --resume latest"
