"""What every command that runs under Accelerate shares: the process state, agreement between ranks,
stop signals, one process per run directory, and the metrics log of a resumable run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState

from cae2.errors import UserError, naming
from pipelines.run_dirs import RunDir
from targets.claims import Claim, Heartbeat, Holder, claim_beside, release, try_claim


def process_state() -> PartialState:
    """Accelerate's view of this process (gloo CPU ranks when no GPU is visible)."""
    return PartialState(cpu=not torch.cuda.is_available())


def init_worker(_: int) -> None:
    """A data-loader worker's `worker_init_fn`: one intra-op thread (the workers already fill the cores),
    and Ctrl-C left to the main process, which stops at a clean point (a worker killed by it would take
    the batch the main process is waiting for)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def end_ranks(state: PartialState) -> None:
    """Every rank reaches the end, then the process group goes (a gloo group left to the interpreter's
    exit can abort a rank that finished early: 'terminate called without an active exception')."""
    if state.num_processes > 1 and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted", "ProcessGroupGloo", "gloo")


def peer_lost(error: BaseException) -> bool:
    """A collective that failed because another rank of the launch is gone (its own line, not this one's
    problem: the launcher says what became of it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistBackendError) or any(s in str(error) for s in _PEER_GONE)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Preemption:
    """Remembers a SIGTERM (a scheduler's preemption) or a Ctrl-C (SIGINT) so that the loop can save and
    stop after the step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class RunLock:
    """One training process (job) per run directory: the main process claims `.<RUN_DIR>.train.claim`
    beside it (targets.claims; a dead or silent holder's claim is taken over), and every rank agrees."""

    def __init__(self, path: Claim | None, holder: Holder | None, heartbeat: Heartbeat | None):
        self.path, self.holder, self.heartbeat = path, holder, heartbeat

    @classmethod
    def take(cls, run_dir: RunDir, accelerator: Accelerator) -> RunLock:
        path = claim_beside(run_dir.location, "train")
        holder, other = Holder.me(), None
        if accelerator.is_main_process:
            ok, other = try_claim(path, holder)
            if not ok:
                accelerator.set_trigger()
        if not accelerator.check_trigger():  # every rank learns whether the main process got it
            if not accelerator.is_main_process:
                return cls(None, None, None)
            heartbeat = Heartbeat()
            heartbeat.add(path)
            return cls(path, holder, heartbeat)
        who = other.describe() if other else "a process that is starting"
        raise UserError(f"--out {run_dir}: {who} is training in it ({path}); wait for it to finish, or use another "
                        "--out")

    def release(self) -> None:
        if self.path is not None and self.holder is not None and self.heartbeat is not None:
            self.heartbeat.stop()
            release(self.path, self.holder)
            self.path = None


class MetricsLog:
    """RUN_DIR/metrics.jsonl (main process) + Accelerate's trackers; on resume drops records past the
    checkpoint, so that the file reads like an uninterrupted run's."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, resume_step: int):
        self.path, self.tensorboard = run_dir / "metrics.jsonl", run_dir / "tensorboard"
        self.accelerator = accelerator
        if accelerator.is_main_process and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with naming(self.path), self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        with naming(self.tensorboard):  # its writer thread's error comes back on the next call
            self.accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=record["step"])

    def close(self) -> None:
        with naming(self.tensorboard):
            self.accelerator.end_training()
