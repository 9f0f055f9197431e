"""Exclusive claims on work (a store's units, a run directory), so that several processes, jobs or
hosts can run the same command on the same output without a coordinator and without two writers.

A claim is a small JSON file (host, pid, the pid's start time, job id, start time) created with
O_CREAT | O_EXCL: exactly one process gets it. Its holder refreshes the file's mtime (a heartbeat)
while it works and deletes the file when done. A claim whose holder is gone is taken over: on the
same host when its pid no longer runs (or now belongs to a later process), on another host when the
heartbeat is older than `stale_after` seconds. Taking over renames the stale file away first, so
two processes that both find it stale cannot both win.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from cae2.errors import UserError, naming

STALE_AFTER = 600.0
"""Seconds without a heartbeat after which another host's claim counts as abandoned."""


def claim_beside(path: str | Path, purpose: str) -> Path:
    """The claim on a whole folder (a store being created, a run dir being trained in): a hidden file
    beside it, `.<name>.<purpose>.claim`, so that it outlives the folder's removal and re-creation."""
    path = Path(path).resolve()
    return path.parent / f".{path.name}.{purpose}.claim"


def claim_within(folder: str | Path, item: str) -> Path:
    """The claim on one piece of work inside a folder (a store's unit): FOLDER/.claims/<item>.claim."""
    return Path(folder) / ".claims" / f"{item}.claim"


def claims_within(folder: str | Path) -> list[Path]:
    return sorted((Path(folder) / ".claims").glob("*.claim"))


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: str | None
    job: str
    started: str

    @classmethod
    def me(cls, pid: int | None = None) -> Holder:
        pid = pid or os.getpid()
        job = next((os.environ[v] for v in ("SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "HOSTNAME") if os.environ.get(v)),
                   "")
        return cls(socket.gethostname(), pid, _proc_start(pid), job,
                   dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}{f' (job {self.job})' if self.job else ''}, since {self.started}"


def holder_alive(holder: Holder, heartbeat_age: float, stale_after: float = STALE_AFTER) -> bool:
    if holder.host != socket.gethostname():
        return heartbeat_age < stale_after
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return holder.pid_start is None or _proc_start(holder.pid) in (None, holder.pid_start)


def read_claim(path: Path) -> tuple[Holder | None, float]:
    """(holder, seconds since its heartbeat); holder None for a file that holds no holder (being
    written right now, or left half-written by a process that failed), (None, inf) for no file. A read
    that fails (EIO) raises, naming the file: whether the work is held cannot be known then."""
    try:
        with naming(path):
            age = time.time() - path.stat().st_mtime
            text = path.read_text()
    except FileNotFoundError:
        return None, float("inf")
    try:
        return Holder(**json.loads(text)), age
    except (ValueError, TypeError):
        return None, age


HALF_WRITTEN_FOR = 5.0
"""Seconds a claim file may hold no holder before it counts as abandoned: its creator writes it right
after creating it, so an older unreadable one was left by a process that failed in between."""


def try_claim(path: Path, holder: Holder, stale_after: float = STALE_AFTER) -> tuple[bool, Holder | None]:
    """(True, None) when `holder` now holds `path`; (False, the live holder) when someone else does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 4 * HALF_WRITTEN_FOR
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other, age = read_claim(path)
            if other is None and age < HALF_WRITTEN_FOR:  # its creator is writing it: look again
                if time.monotonic() > deadline:
                    raise UserError(f"claim {path} has been rewritten without a holder for "
                                    f"{4 * HALF_WRITTEN_FOR:.0f} s; remove it if no process is working on it, "
                                    "then rerun") from None
                time.sleep(0.05)
                continue
            if other is not None and (other == holder or holder_alive(other, age, stale_after)):
                return other == holder, None if other == holder else other
            with contextlib.suppress(FileNotFoundError):  # only one of the processes that found it stale wins
                os.rename(path, path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}"))
                for old in path.parent.glob(f"{path.name}.stale.*"):
                    old.unlink(missing_ok=True)
            continue
        try:
            with naming(path), os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(holder)))
        except BaseException:
            with contextlib.suppress(OSError):  # a half-written claim would hold the work for HALF_WRITTEN_FOR
                path.unlink()
            raise
        return True, None


def release(path: Path, holder: Holder) -> None:
    """Delete the claim if `holder` holds it. A claim that cannot be read is left: the work it covers
    is done or will be redone, and a dead holder's claim is taken over."""
    with contextlib.suppress(OSError):
        other, _ = read_claim(path)
        if other == holder:
            path.unlink(missing_ok=True)


class Heartbeat:
    """Refreshes the mtime of the claims it holds every `period` seconds, from a daemon thread."""

    def __init__(self, period: float = STALE_AFTER / 6):
        self.paths: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True, name="claims-heartbeat")
        self._thread.start()

    def add(self, path: Path) -> None:
        with self._lock:
            self.paths.add(path)

    def discard(self, path: Path) -> None:
        with self._lock:
            self.paths.discard(path)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            with self._lock:
                paths = list(self.paths)
            for p in paths:
                with contextlib.suppress(OSError):
                    os.utime(p)

    def stop(self) -> None:
        self._stop.set()
