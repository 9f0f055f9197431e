"""Local copies of objects in object stores, so that everything past the bucket reads local files.

    CACHE/<scheme>/<bucket>/<key>          the copy (shards, a store's metadata and units, checkpoints read)
    CACHE/.etags/<scheme>/<bucket>/<key>   the etag it was copied at (a changed object is copied again)
    CACHE/runs/...                         run dirs' staging folders (`pipelines.run_dirs`; never evicted)

A copy is made whole, through a temporary name, so processes of one host (ranks, loader workers) share
the cache safely; the one that renames last wins with identical bytes. The cache is capped (`--cache-size`):
when it grows past the cap, the copies used longest ago go first, never one used in the last ten minutes
(a running epoch's). An epoch that fits reads nothing twice from the bucket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from targets.storage import Location, Meta

CACHE_VARIABLE, SIZE_VARIABLE = "CAE2_CACHE_DIR", "CAE2_CACHE_GIB"
RECENT = 600.0
"""Seconds after its last use during which a copy is never evicted."""
logger = logging.getLogger(__name__)
DEFAULT_GIB = 100.0


def _cap_from_environment() -> int:
    try:
        return int(float(os.environ.get(SIZE_VARIABLE, DEFAULT_GIB)) * 2**30)
    except ValueError:
        return int(DEFAULT_GIB * 2**30)


_settings: dict = {"root": None, "cap": _cap_from_environment()}
_state = {"estimate": -1, "warned": False}
_lock = threading.Lock()


def configure(root: str | None, cap_gib: float) -> None:
    """The cache's folder (None: CAE2_CACHE_DIR, else ~/.cache/cae2) and its cap in GiB; processes started
    later get them through the environment."""
    with _lock:
        _settings["root"], _settings["cap"] = root, int(cap_gib * 2**30)
        _state["estimate"] = -1
    if root:
        os.environ[CACHE_VARIABLE] = str(Path(root).expanduser().resolve())
    os.environ[SIZE_VARIABLE] = str(cap_gib)


def cache_root() -> Path:
    root = _settings["root"] or os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "cae2"
    return Path(root).expanduser()


def copy_path(where: Location) -> Path:
    """Where the copy of a remote object (or the mirror of a remote folder) lives."""
    scheme, rest = where.url.split("://", 1)
    return cache_root() / scheme / rest


def _etag_path(where: Location) -> Path:
    scheme, rest = where.url.split("://", 1)
    return cache_root() / ".etags" / scheme / rest


def fresh(where: Location, meta: Meta) -> bool:
    """True when the local copy is the object `meta` describes (its size, and its etag where one is kept)."""
    path = copy_path(where)
    try:
        if path.stat().st_size != meta.size:
            return False
    except OSError:
        return False
    if meta.etag is None:
        return True
    try:
        return _etag_path(where).read_text() == meta.etag
    except OSError:
        return False


def fetch(where: Location, meta: Meta | None = None) -> Path:
    """The local copy of a remote object, copied now unless it is fresh (`meta`: the object's size and etag,
    from a listing; None: looked up). The copy's use is recorded for the cap."""
    meta = meta or where.head()
    if meta is None:
        raise FileNotFoundError(f"{where} does not exist")
    path = copy_path(where)
    if fresh(where, meta):
        _touch(path)
        return path
    where.download(path)
    logger.debug(f"copied {where} ({meta.size} bytes) into the local cache")
    if meta.etag is not None:
        etag = _etag_path(where)
        etag.parent.mkdir(parents=True, exist_ok=True)
        etag.write_text(meta.etag)
    _grew(meta.size)
    return path


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _files(root: Path) -> list[tuple[Path, os.stat_result]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".etags", "runs") or Path(dirpath) != root]
        for name in filenames:
            p = Path(dirpath) / name
            try:
                out.append((p, p.stat()))
            except OSError:
                continue
    return out


def _grew(nbytes: int) -> None:
    """Account for a new copy; past the cap, evict the copies used longest ago (not the recent ones)."""
    with _lock:
        if _state["estimate"] < 0:
            _state["estimate"] = sum(st.st_size for _, st in _files(cache_root()))
        _state["estimate"] += nbytes
        if _state["estimate"] <= _settings["cap"]:
            return
        _state["estimate"] = _evict(cache_root(), _settings["cap"])


def _evict(root: Path, cap: int) -> int:
    """Delete least recently used copies until the cache is under `cap` -> the bytes left."""
    files = sorted(_files(root), key=lambda f: f[1].st_mtime)
    total = sum(st.st_size for _, st in files)
    now = time.time()
    for path, st in files:
        if total <= cap:
            break
        if now - st.st_mtime < RECENT:
            break  # everything left is in use
        try:
            path.unlink()
            total -= st.st_size
        except OSError:
            continue
    if total > cap and not _state["warned"]:
        _state["warned"] = True
        logger.warning(f"the local cache {root} holds {total / 2**30:.1f} GiB of copies used in the last "
                       f"{RECENT / 60:.0f} minutes, over --cache-size {cap / 2**30:.1f} GiB: raise it to the data "
                       "a run reads per epoch, or later epochs read the bucket again")
    return total


def clear(where: Location) -> None:
    """Forget the copies under a remote folder (a unit that is rewritten)."""
    shutil.rmtree(copy_path(where), ignore_errors=True)
    shutil.rmtree(_etag_path(where), ignore_errors=True)
