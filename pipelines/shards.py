"""WebDataset shards: resolving a shard SPEC, reading a shard's samples, and writing shards.

A shard is known by its file name (`Shard.name`), not its URL, so a store built from shards in
one place serves copies of them elsewhere (object store vs local disk).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import google_crc32c
from braceexpand import braceexpand
from webdataset.tariterators import tarfile_samples

from cae2.errors import Stopped, Terminated, UserError, naming
from cae2.fields import Argument, PathKind, Range
from targets.local_copies import fetch
from targets.storage import Location, Meta, is_remote, same_place
from targets.storage_settings import StorageSettings

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "img")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class Shard:
    url: str
    name: str


def shard_name(url: str) -> str:
    return os.path.basename(url.split("?", 1)[0].rstrip("/"))


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str, option: str = "--shards") -> list[Shard]:
    """A brace pattern, a directory, a glob, or a text file listing one shard URL per line; on an object store
    (s3://...) a brace pattern, a glob or a folder, checked with one listing per folder."""
    spec = spec.strip()
    if not spec:
        raise UserError(f"{option} is empty; pass a directory, a brace pattern, a glob or a list file")
    urls = _remote_urls(spec, option) if is_remote(spec) else _local_urls(spec, option)
    _check_made(urls, option)
    shards = [Shard(u, shard_name(u)) for u in urls]
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen:
            raise UserError(f"{option}: two shards share the file name {s.name} ({seen[s.name]}, {s.url}); "
                            "shards are identified by file name, so names must be unique")
        seen[s.name] = s.url
    return shards


def _local_urls(spec: str, option: str) -> list[str]:
    if os.path.isdir(spec):
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise UserError(f"{option}: directory {spec} has no .tar shards")
        return urls
    if os.path.isfile(spec) and not spec.endswith(".tar"):
        with open(spec) as f:
            urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not urls:
            raise UserError(f"{option}: list file {spec} names no shards")
        return urls
    urls = []
    for part in braceexpand(spec):
        if not _is_remote(part) and any(c in part for c in "*?["):
            matches = sorted(glob.glob(part))
            if not matches:
                raise UserError(f"{option}: glob {part} matches no files")
            urls += matches
        else:
            urls.append(part)
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{option}: shard {missing[0]} does not exist{more}; check the path or pattern")
    return urls


def _check_made(urls: list[str], option: str) -> None:
    """Shards from a folder that make-shards wrote must be its finished set: a folder whose make-shards.json
    does not say complete (an interrupted make-shards) is refused, and so is a finished one missing a shard.
    Folders without the record (shards made by other tools) are taken as they are."""
    folders: dict[str, set[str]] = {}
    for url in urls:
        if is_remote(url):
            folders.setdefault(str(Location.of(url).parent), set()).add(shard_name(url))
        elif not _is_remote(url):
            folders.setdefault(os.path.dirname(os.path.abspath(url)), set()).add(shard_name(url))
    for folder, names in folders.items():
        try:
            plan = json.loads(_read_text(Location.of(folder) / PLAN))
        except (FileNotFoundError, ValueError):
            continue
        if not isinstance(plan, dict) or not isinstance(plan.get("shards"), list):
            continue
        planned = set(plan["shards"])
        if not plan.get("complete") or names & planned:
            present = _names_in(folder)
        if not plan.get("complete"):
            raise UserError(f"{option}: make-shards has not finished {folder} ({len(planned & present)} of "
                            f"{len(planned)} shards written); rerun `cae2 make-shards {plan.get('source', 'SOURCE')} "
                            f"{folder}` to finish it")
        if names & planned:
            missing = sorted(planned - present)
            if missing:
                raise UserError(f"{option}: {folder} is missing {len(missing)} of the {len(planned)} shards "
                                f"make-shards wrote there (e.g. {missing[0]}); restore them or rerun make-shards into "
                                "a new folder")


def _names_in(folder: str) -> set[str]:
    """The file names in a folder (an object-store folder's from the listing its shards were found in)."""
    where = Location.of(folder)
    if where.remote:
        listed = {url.rsplit("/", 1)[1] for url in _LISTED if url.rsplit("/", 1)[0] == folder}
        return listed or {m.name for m in where.list() if "/" not in m.name}
    return set(os.listdir(where.path))


_LISTED: dict[str, Meta] = {}
"""Shards in object stores as their folder's listing described them (their identity without a request each)."""


def _listing(folder: Location) -> dict[str, Meta]:
    metas = {m.name: m for m in folder.list() if "/" not in m.name}
    _LISTED.update({str(folder / name): m for name, m in metas.items()})
    return metas


def _remote_urls(spec: str, option: str) -> list[str]:
    """Shards in an object store: every name checked against one listing of its folder (no request per shard)."""
    parts = list(braceexpand(spec))
    if len(parts) == 1 and not parts[0].endswith(".tar") and not any(c in parts[0] for c in "*?["):
        folder = Location.of(parts[0])
        urls = [str(folder / name) for name in _listing(folder) if name.endswith(".tar")]
        if not urls:
            raise UserError(f"{option}: {folder} holds no .tar shards")
        return urls
    listings: dict[str, set[str]] = {}
    urls = []
    for part in parts:
        where = Location.of(part)
        folder = str(where.parent)
        if folder not in listings:
            listings[folder] = set(_listing(where.parent))
        matches = sorted(fnmatch.filter(listings[folder], where.name))
        if not matches:
            what = "matches no objects" if any(c in where.name for c in "*?[") else "does not exist"
            raise UserError(f"{option}: shard {where} {what}; check the URL or pattern (and the credentials' "
                            "access to the bucket)")
        urls += [f"{folder}/{m}" for m in matches]
    return urls


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one shard in file order, streamed with WebDataset (dict: __key__, fields as bytes). A shard
    in an object store is read from its local copy (`targets.local_copies`: fetched whole once)."""
    def reraise(e: Exception) -> bool:
        # webdataset appends " @ <stream>" to the message and hands the error to each of its stages' handlers
        message = str(e.args[0]).split(" @ ")[0] if e.args else str(e)
        if isinstance(e, UserError):
            raise UserError(message) from None
        raise UserError(f"shard {url} cannot be read ({type(e).__name__}: {message}); check or rewrite the shard "
                        "(cae2 make-shards)") from None

    source = str(local_copy(url)) if is_remote(url) else url
    yield from tarfile_samples([{"url": source}], handler=reraise)


def local_copy(url: str) -> Path:
    """The local copy of a shard in an object store (named in the error when it is gone)."""
    try:
        return fetch(Location.of(url), _LISTED.get(url))
    except FileNotFoundError:
        raise UserError(f"shard {url} does not exist (any more); pass the shards the store was made from") from None


def shard_identity(url: str) -> dict | None:
    """What a completion marker records of the shard a unit was made from: its size, modification time
    and crc32c; for a shard in an object store its size and etag."""
    if is_remote(url):
        meta = _LISTED.get(url) or Location.of(url).head()
        return {"size": meta.size, "etag": meta.etag} if meta is not None else None
    if _is_remote(url):
        return None
    crc = 0
    with naming(url), open(url, "rb") as f:
        while block := f.read(1 << 22):
            crc = google_crc32c.extend(crc, block)
        st = os.fstat(f.fileno())
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "crc32c": f"{crc:08x}"}


def shard_changed(recorded: dict | None, url: str, read: bool = True) -> str | None:
    """How the shard at `url` differs from the one a unit was made from, or None when it is the same (or
    cannot be told: a pipe, a unit written before identities were recorded, or from a shard elsewhere).
    The size decides at once; the crc32c is read only when the modification time differs (a copy of the
    same bytes) and `read` allows it (stage 2 checks sizes here and every sample's key as it streams); an
    object's etag where both have one."""
    if not recorded or (_is_remote(url) and not is_remote(url)):
        return None
    if is_remote(url):
        now = shard_identity(url)
        if now is None:
            return None  # a missing shard is reported where it is read
        if now["size"] != recorded["size"]:
            return f"it has {now['size']} bytes, the unit was made from {recorded['size']}"
        if "etag" in recorded and now["etag"] != recorded["etag"]:
            return f"its etag is {now['etag']}, the unit was made from {recorded['etag']}"
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None  # a missing shard is reported where it is read
    if st.st_size != recorded["size"]:
        return f"it has {st.st_size} bytes, the unit was made from {recorded['size']}"
    if read and "mtime_ns" in recorded and st.st_mtime_ns != recorded["mtime_ns"]:
        crc = (shard_identity(url) or {}).get("crc32c")
        if crc != recorded["crc32c"]:
            return f"its crc32c is {crc}, the unit was made from {recorded['crc32c']}"
    return None


def image_bytes(sample: dict) -> bytes | None:
    for f in IMAGE_FIELDS:
        if f in sample:
            return sample[f]
    return None


def image_crc(sample: dict) -> int:
    """crc32c of a sample's image bytes (0 without an image): what stage 1 records of the image it saw."""
    data = image_bytes(sample)
    return google_crc32c.value(data) if data is not None else 0


def required_image_bytes(sample: dict) -> bytes:
    """The image of a sample that must have one (stage 1 found it valid)."""
    data = image_bytes(sample)
    if data is None:
        raise UserError(f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')} has no image field "
                        f"({', '.join(IMAGE_FIELDS)}): the shard differs from the one the store was made from")
    return data


# --- make-shards -----------------------------------------------------------------------------

@dataclass(kw_only=True)
class MakeShardsConfig(StorageSettings):
    """Every option of `cae2 make-shards`."""

    source: Annotated[Path, Argument()]
    """Image folder (class sub-folders = labels) or a file of paths."""
    out_dir: Annotated[str, Argument(), PathKind("out_dir")]
    """Directory (or s3://... folder) for the .tar shards; rerun the same command to finish an interrupted run."""
    samples_per_shard: Annotated[int, Range(min=1)] = 1000
    """Images per shard."""
    prefix: str = "shard"
    """Shard file name prefix."""


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _collect(source: Path, out: Location) -> list[tuple[Path, int, str]]:
    """-> [(path, label, class name)] in a deterministic order. Shard folders inside SOURCE (OUT_DIR, or the
    output of an earlier make-shards) are left out and named; a class folder without images is refused."""
    if source.is_file():
        paths = [Path(line.strip()) for line in source.read_text().splitlines() if line.strip()]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{source}: listed image {missing[0]} does not exist")
        return [(p, -1, "") for p in paths]
    if not source.is_dir():
        raise UserError(f"SOURCE {source} is neither an image folder nor a text file of paths")
    folders = sorted(d for d in source.iterdir() if d.is_dir())
    outputs = [d for d in folders if (d / PLAN).is_file() or (not out.remote and same_place(d, out.path))]
    if outputs:
        logger.warning(f"SOURCE {source}: left out {', '.join(d.name for d in outputs)} (shards made by make-shards, "
                       "not a class)")
    classes = [d.name for d in folders if d not in outputs]
    if classes:
        items, empty = [], []
        for label, cls in enumerate(classes):
            found = [(p, label, cls) for p in sorted((source / cls).rglob("*"))
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            items += found
            if not found:
                empty.append(cls)
        if empty:
            raise UserError(f"SOURCE {source}: class folder(s) {', '.join(empty[:5])} hold no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}), yet each would take a label; remove them or add "
                            "their images")
    else:
        items = [(p, -1, "") for p in sorted(source.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"SOURCE {source} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


PLAN = "make-shards.json"
"""OUT_DIR's record of what its shards are made of (the input, the split); `complete` once every shard is."""


def make_shards(source: Path, out_dir: str | Path, samples_per_shard: int = 1000, prefix: str = "shard") -> list[str]:
    """Image folder (class sub-folders -> labels, flat -> -1) or list file -> WebDataset tar shards, in a
    local folder or an object store (each tar written locally, then uploaded whole). A rerun of the same
    command keeps the complete shards and writes the rest; OUT_DIR holding shards of another input is refused.

    Each sample: `jpg` = the original file bytes, `cls` = label, `json` = source path and class.
    Keys are `<index>_<file stem>` with anything but letters, digits, '_' and '-' replaced, so they
    never contain dots.
    """
    if samples_per_shard < 1:
        raise UserError("--samples-per-shard must be >= 1")
    out = Location.of(out_dir)
    if not out.remote and same_place(source, out.path):
        raise UserError(f"OUT_DIR {out_dir} is SOURCE; write the shards to another folder")
    items = _collect(source, out)
    names = [f"{prefix}-{i:06d}.tar" for i in range(-(-len(items) // samples_per_shard))]
    plan = {"source": str(source), "samples_per_shard": samples_per_shard, "prefix": prefix, "shards": names,
            "items_sha256": hashlib.sha256("\n".join(f"{p}\t{label}" for p, label, _ in items).encode()).hexdigest()}
    done = _begin_plan(out, plan, prefix)
    try:
        for i, name in enumerate(names):
            if name not in done:
                _write_shard(out / name, items[i * samples_per_shard:(i + 1) * samples_per_shard],
                             i * samples_per_shard)
                done.add(name)
    except (KeyboardInterrupt, Terminated) as e:  # the shard being written is removed by _write_shard
        how, status = ("Ctrl-C", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
        raise Stopped(f"make-shards stopped ({how}) with {len(done & set(names))} of {len(names)} shards complete "
                      f"in {out}; rerun the same command to write the rest", status) from None
    _write_text(out / PLAN, json.dumps(plan | {"complete": True}, indent=1))
    return [str(out / name) for name in names]


def _begin_plan(out: Location, plan: dict, prefix: str) -> set[str]:
    """Record the plan in OUT_DIR (or check it against the one there) -> the names of its complete shards."""
    if out.remote:
        present = {m.name for m in out.list() if "/" not in m.name}
    else:
        out.path.mkdir(parents=True, exist_ok=True)
        for partial in out.path.glob("*.tar.partial"):
            partial.unlink()  # a shard an interrupted run was writing
        present = {p.name for p in out.path.iterdir()}
    shards = {n for n in present if fnmatch.fnmatch(n, f"{prefix}-*.tar")}
    if shards:
        try:
            recorded = json.loads(_read_text(out / PLAN))
        except (FileNotFoundError, ValueError):
            recorded = None
        same = recorded is not None and {k: v for k, v in recorded.items() if k != "complete"} == plan
        if not same:
            raise UserError(f"OUT_DIR {out} already holds {prefix}-*.tar shards of another input or split; choose "
                            "an empty directory (a rerun of the same command finishes an interrupted one)")
    _write_text(out / PLAN, json.dumps(plan | {"complete": False}, indent=1))
    return shards


def _read_text(where: Location) -> str:
    return where.get().decode() if where.remote else where.path.read_text()


def _write_text(where: Location, text: str) -> None:
    if where.remote:
        where.put(text.encode())
    else:
        tmp = where.path.with_name(where.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, where.path)


def _write_shard(where: Location, items: list[tuple[Path, int, str]], first: int) -> None:
    """One tar, written under a temporary name and renamed (local) or uploaded whole (object store)."""
    staging = Path(tempfile.mkdtemp(prefix="cae2-shard-")) if where.remote else None
    tmp = (staging / where.name) if staging else where.path.with_suffix(".tar.partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, (img, label, cls) in enumerate(items, first):
                key = f"{index:08d}_{_UNSAFE.sub('_', img.stem)}"[:90]
                meta = json.dumps({"path": str(img), "label": label, "class": cls}).encode()
                for ext, data in (("jpg", img.read_bytes()), ("cls", str(label).encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        if staging:
            where.upload(tmp)
        else:
            os.replace(tmp, where.path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
