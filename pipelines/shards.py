"""WebDataset shards: resolving a shard SPEC, reading a shard's samples, and writing shards.

A shard is known by its file name (`Shard.name`), not its URL, so a store built from shards in
one place serves copies of them elsewhere (object store vs local disk).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import google_crc32c
from braceexpand import braceexpand
from webdataset.tariterators import tarfile_samples

from cae2.errors import UserError, naming
from cae2.fields import Argument, PathKind, Range

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
    """A brace pattern, a directory, a glob, or a text file listing one shard URL per line."""
    spec = spec.strip()
    if not spec:
        raise UserError(f"{option} is empty; pass a directory, a brace pattern, a glob or a list file")
    if os.path.isdir(spec):
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise UserError(f"{option}: directory {spec} has no .tar shards")
    elif os.path.isfile(spec) and not spec.endswith(".tar"):
        with open(spec) as f:
            urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not urls:
            raise UserError(f"{option}: list file {spec} names no shards")
    else:
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
    shards = [Shard(u, shard_name(u)) for u in urls]
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen:
            raise UserError(f"{option}: two shards share the file name {s.name} ({seen[s.name]}, {s.url}); "
                            "shards are identified by file name, so names must be unique")
        seen[s.name] = s.url
    return shards


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one shard in file order, streamed with WebDataset (dict: __key__, fields as bytes)."""
    def reraise(e: Exception) -> bool:
        # webdataset appends " @ <stream>" to the message and hands the error to each of its stages' handlers
        message = str(e.args[0]).split(" @ ")[0] if e.args else str(e)
        if isinstance(e, UserError):
            raise UserError(message) from None
        raise UserError(f"shard {url} cannot be read ({type(e).__name__}: {message}); check or rewrite the shard "
                        "(cae2 make-shards)") from None

    yield from tarfile_samples([{"url": url}], handler=reraise)


def shard_identity(url: str) -> dict | None:
    """What a completion marker records of the shard a unit was made from: its size, modification time
    and crc32c (None for a remote shard)."""
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
    cannot be told: a remote shard, a unit written before identities were recorded). The size decides at
    once; the crc32c is read only when the modification time differs (a copy of the same bytes) and
    `read` allows it (stage 2 checks sizes here and every sample's key as it streams)."""
    if not recorded or _is_remote(url):
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None  # a missing shard is reported where it is read
    if st.st_size != recorded["size"]:
        return f"it has {st.st_size} bytes, the unit was made from {recorded['size']}"
    if read and st.st_mtime_ns != recorded["mtime_ns"]:
        crc = (shard_identity(url) or {}).get("crc32c")
        if crc != recorded["crc32c"]:
            return f"its crc32c is {crc}, the unit was made from {recorded['crc32c']}"
    return None


def image_bytes(sample: dict) -> bytes | None:
    for f in IMAGE_FIELDS:
        if f in sample:
            return sample[f]
    return None


def required_image_bytes(sample: dict) -> bytes:
    """The image of a sample that must have one (stage 1 found it valid)."""
    data = image_bytes(sample)
    if data is None:
        raise UserError(f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')} has no image field "
                        f"({', '.join(IMAGE_FIELDS)}): the shard differs from the one the store was made from")
    return data


# --- make-shards -----------------------------------------------------------------------------

@dataclass(kw_only=True)
class MakeShardsConfig:
    """Every option of `cae2 make-shards`."""

    source: Annotated[Path, Argument()]
    """Image folder (class sub-folders = labels) or a file of paths."""
    out_dir: Annotated[Path, Argument(), PathKind("out_dir")]
    """Directory for the .tar shards."""
    samples_per_shard: Annotated[int, Range(min=1)] = 1000
    """Images per shard."""
    prefix: str = "shard"
    """Shard file name prefix."""


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _collect(source: Path) -> list[tuple[Path, int, str]]:
    """-> [(path, label, class name)] in a deterministic order."""
    if source.is_file():
        paths = [Path(line.strip()) for line in source.read_text().splitlines() if line.strip()]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{source}: listed image {missing[0]} does not exist")
        return [(p, -1, "") for p in paths]
    if not source.is_dir():
        raise UserError(f"SOURCE {source} is neither an image folder nor a text file of paths")
    classes = sorted(d.name for d in source.iterdir() if d.is_dir())
    if classes:
        items = []
        for label, cls in enumerate(classes):
            items += [(p, label, cls) for p in sorted((source / cls).rglob("*"))
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        items = [(p, -1, "") for p in sorted(source.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"SOURCE {source} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def make_shards(source: Path, out_dir: Path, samples_per_shard: int = 1000, prefix: str = "shard") -> list[Path]:
    """Image folder (class sub-folders -> labels, flat -> -1) or list file -> WebDataset tar shards.

    Each sample: `jpg` = the original file bytes, `cls` = label, `json` = source path and class.
    Keys are `<index>_<file stem>` with anything but letters, digits, '_' and '-' replaced, so they
    never contain dots.
    """
    if samples_per_shard < 1:
        raise UserError("--samples-per-shard must be >= 1")
    items = _collect(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob(f"{prefix}-*.tar")):
        raise UserError(f"OUT_DIR {out_dir} already holds {prefix}-*.tar shards; choose an empty directory")
    paths = []
    for start in range(0, len(items), samples_per_shard):
        path = out_dir / f"{prefix}-{start // samples_per_shard:06d}.tar"
        tmp = path.with_suffix(".tar.partial")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, (img, label, cls) in enumerate(items[start:start + samples_per_shard], start):
                key = f"{index:08d}_{_UNSAFE.sub('_', img.stem)}"[:90]
                meta = json.dumps({"path": str(img), "label": label, "class": cls}).encode()
                for ext, data in (("jpg", img.read_bytes()), ("cls", str(label).encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        paths.append(path)
    return paths
