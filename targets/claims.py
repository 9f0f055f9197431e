"""Exclusive claims on work (a store's units, a run directory), so that several processes, jobs or
hosts can run the same command on the same output without a coordinator and without two writers.

A claim is a small JSON document (host, pid, the pid's start time, job id, start time) that exactly one
process gets to create: on a file system with O_CREAT | O_EXCL, in an object store with a conditional
create (If-None-Match). Its holder refreshes it while it works (a heartbeat: the file's mtime, or the
object rewritten with compare-and-swap on its etag) and deletes it when done. A claim whose holder is
gone is taken over: on the same host when its pid no longer runs (or now belongs to a later process), on
another host when the heartbeat is older than `stale_after` seconds, by the object store's clock for
objects (never this host's). Taking over is exclusive too: a rename of the stale file away first, or a
compare-and-swap on the stale object's etag, so two processes that both find it stale cannot both win.
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
from targets.storage import Location

STALE_AFTER = 600.0
"""Seconds without a heartbeat after which another host's claim counts as abandoned."""


Claim = Path | Location
"""A claim file, or a claim object in an object store."""


def claim_beside(path: str | Path | Location, purpose: str) -> Claim:
    """The claim on a whole folder (a store being created, a run dir being trained in): a hidden file
    beside it, `.<name>.<purpose>.claim`, so that it outlives the folder's removal and re-creation."""
    where = Location.of(path)
    if where.remote:
        return where.parent / f".{where.name}.{purpose}.claim"
    local = where.path.resolve()
    return local.parent / f".{local.name}.{purpose}.claim"


def claim_within(folder: str | Path | Location, item: str) -> Claim:
    """The claim on one piece of work inside a folder (a store's unit): FOLDER/.claims/<item>.claim."""
    where = Location.of(folder)
    return where / ".claims" / f"{item}.claim" if where.remote else where.path / ".claims" / f"{item}.claim"


def claims_within(folder: str | Path | Location) -> list[Claim]:
    where = Location.of(folder)
    if where.remote:
        claims = where / ".claims"
        return [claims / m.name for m in claims.list() if m.name.endswith(".claim") and "/" not in m.name]
    return [*sorted((where.path / ".claims").glob("*.claim"))]


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


def read_claim(path: Claim, now: dt.datetime | None = None) -> tuple[Holder | None, float]:
    """(holder, seconds since its heartbeat); holder None for a claim that holds no holder (being
    written right now, or left half-written by a process that failed), (None, inf) for no claim. A read
    that fails (EIO) raises, naming the file: whether the work is held cannot be known then. `now`: the time
    an object claim's age is taken against (default: the object store's clock, which costs a write beside it;
    readers that must not write pass this host's)."""
    if isinstance(path, Location):
        state = _read_object(path)
        return (None, float("inf")) if state is None else (state.holder, state.age(path, now))
    try:
        with naming(path):
            age = time.time() - path.stat().st_mtime
            text = path.read_text()
    except FileNotFoundError:
        return None, float("inf")
    return _holder(text), age


def _holder(text: str | bytes) -> Holder | None:
    try:
        fields = json.loads(text)
        fields.pop("beat", None)
        return Holder(**fields)
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class _ObjectClaim:
    holder: Holder | None
    etag: str | None
    modified: dt.datetime

    def age(self, where: Location, now: dt.datetime | None = None) -> float:
        """Seconds since its last write, by the object store's clock (or `now`)."""
        return max(0.0, ((now or where.server_now()) - self.modified).total_seconds())


def _read_object(where: Location) -> _ObjectClaim | None:
    try:
        data, etag, modified = where.get_with_etag()
    except FileNotFoundError:
        return None
    return _ObjectClaim(_holder(data), etag, modified)


HALF_WRITTEN_FOR = 5.0
"""Seconds a claim file may hold no holder before it counts as abandoned: its creator writes it right
after creating it, so an older unreadable one was left by a process that failed in between."""


_etags: dict[str, tuple[str, Holder]] = {}  # claim objects held here -> (etag of the last write, holder)
_etags_lock = threading.Lock()


def _claim_document(holder: Holder, beat: int = 0) -> bytes:
    return json.dumps(asdict(holder) | {"beat": beat}).encode()  # the beat changes the etag of every rewrite


def _try_claim_object(where: Location, holder: Holder, stale_after: float) -> tuple[bool, Holder | None]:
    """try_claim on an object store: a conditional create; a stale claim taken over by compare-and-swap."""
    for _ in range(100):
        etag = where.put(_claim_document(holder), create=True)
        if etag is not None:
            with _etags_lock:
                _etags[where.url] = etag, holder
            return True, None
        state = _read_object(where)
        if state is None:
            continue  # released meanwhile: create it again
        if state.holder == holder:  # AWS answers 409 for a create it did make: ours
            with _etags_lock:
                _etags[where.url] = state.etag or "", holder
            return True, None
        if state.holder is not None and holder_alive(state.holder, state.age(where), stale_after):
            return False, state.holder
        if state.holder is None and state.age(where) < HALF_WRITTEN_FOR:
            time.sleep(0.2)
            continue
        etag = where.put(_claim_document(holder), if_match=state.etag)  # exactly one taker wins
        if etag is not None:
            with _etags_lock:
                _etags[where.url] = etag, holder
            return True, None
    raise UserError(f"claim {where} keeps changing hands; is a process rewriting it? Remove it if no job is working")


def try_claim(path: Claim, holder: Holder, stale_after: float = STALE_AFTER) -> tuple[bool, Holder | None]:
    """(True, None) when `holder` now holds `path`; (False, the live holder) when someone else does."""
    if isinstance(path, Location):
        return _try_claim_object(path, holder, stale_after)
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


def release(path: Claim, holder: Holder) -> None:
    """Delete the claim if `holder` holds it. A claim that cannot be read is left: the work it covers
    is done or will be redone, and a dead holder's claim is taken over."""
    if isinstance(path, Location):
        with _etags_lock:
            _etags.pop(path.url, None)
        with contextlib.suppress(OSError, UserError):
            state = _read_object(path)
            if state is not None and state.holder == holder:
                path.delete()
        return
    with contextlib.suppress(OSError):
        other, _ = read_claim(path)
        if other == holder:
            path.unlink(missing_ok=True)


class Heartbeat:
    """Refreshes the claims it holds every `period` seconds, from a daemon thread: a file's mtime, or an object
    rewritten by compare-and-swap (a claim another process has taken over meanwhile is `lost`)."""

    def __init__(self, period: float = STALE_AFTER / 6):
        self.paths: set[Claim] = set()
        self.lost: set[str] = set()
        self._beats = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True, name="claims-heartbeat")
        self._thread.start()

    def add(self, path: Claim) -> None:
        with self._lock:
            self.paths.add(path)

    def discard(self, path: Claim) -> None:
        with self._lock:
            self.paths.discard(path)

    def holds(self, path: Claim) -> bool:
        """False once another process has taken the claim over (object stores; files: always True)."""
        return str(path) not in self.lost

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            with self._lock:
                paths = list(self.paths)
            for p in paths:
                with contextlib.suppress(OSError, UserError):
                    self._beat(p)

    def _beat(self, path: Claim) -> None:
        if not isinstance(path, Location):
            os.utime(path)
            return
        with _etags_lock:
            held = _etags.get(path.url)
        if held is None:
            return
        etag, holder = held
        self._beats += 1
        new = path.put(_claim_document(holder, self._beats), if_match=etag)
        with _etags_lock:
            if new is None:
                self.lost.add(path.url)
                _etags.pop(path.url, None)
            elif path.url in _etags:
                _etags[path.url] = new, holder

    def stop(self) -> None:
        self._stop.set()
