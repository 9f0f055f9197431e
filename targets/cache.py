"""The target store: a self-describing Zarr v3 group of teacher latents keyed by view parameters.

Layout (see docs/cache.md):

    STORE/zarr.json                      attrs["cae2"]: schema, teacher, views, seed, K, grid, dims, ...
    STORE/units/<shard file name>/       one group per input shard ("unit"); attrs["complete"] last
        latents     [N, K, 1 + T, D] float16   chunk = one view; block (a zarr shard file) = `images_per_shard`
                                               images
                                               (int8 stores: int8, and scales [N, K, 1 + T] float32;
                                               latents ~= latents * scales[..., None])
        keys        [N] str                    sample keys in shard order
        valid       [N] bool                   False: skipped in stage 1 (reason in the marker)
        view_int    [N, K, 10] int32           jitter order (4), flip, crop top, left, height, width,
                                               contrast mean (-1: contrast off; schema 1 has 9 columns)
        view_float  [N, K, 4] float32          brightness, contrast, saturation, hue factors
        image_hw    [N, 2] int32               decoded image size (H, W)

Row i of a unit is the i-th sample of the shard, so stage 2 joins a streamed sample to its
targets by (shard name, position) and checks the key. Exactly one process writes a unit, every
block of `latents` is written whole in one call, and the completion marker (sample count,
checksum, skipped samples) is written last: a unit without it is incomplete and is redone.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr

from cae2.errors import UserError, naming
from targets.block_files import BlockFileReader, BlockFileWriter, LatentsChecksum
from targets.claims import (
    Holder,
    claim_beside,
    claim_within,
    claims_within,
    holder_alive,
    read_claim,
    release,
    try_claim,
)
from targets.quantize import dequantize

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: view_int without the contrast mean (stage 2 recomputes it from the image)
ROOT_ATTR = "cae2"
MARKER_ATTR = "complete"
N_INT, N_FLOAT = 10, 4


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """Everything that determines the cached values; two runs into one store must agree on it."""

    teacher: dict
    views: dict
    seed: int
    views_per_image: int
    input_size: int
    grid: tuple[int, int]
    num_tokens: int
    latent_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    images_per_shard: int = 32
    """Rows per block of a unit's latents (one file: a shard of the sharded Zarr array)."""
    latent_format: str = "fp16"
    """fp16: the teacher's latents in float16; int8: int8 with one float32 scale per token (targets.quantize)."""
    decoder: str = "pillow"
    """Image decoder whose pixels the views were cut from (`targets.decoders`; the view ops are exact on both
    view paths); rows a device decoder left to Pillow are listed in their unit's marker."""
    view_path: str = "pillow"
    """View path of the run that created the store (pillow | device: bit-identical views; each unit's
    marker records its own)."""
    schema_version: int = SCHEMA_VERSION
    cae2_version: str = ""
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    # Fields that do not change the values (layout/bookkeeping) are not compared.
    _UNCOMPARED = ("cae2_version", "created", "images_per_shard", "schema_version", "view_path")

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> StoreMeta:
        d = dict(d)
        for k in ("grid", "mean", "std"):
            d[k] = tuple(d[k])
        return cls(**d)

    def differences(self, other: StoreMeta) -> list[str]:
        a, b = self.to_json(), other.to_json()
        out = []
        for k in a:
            if k in self._UNCOMPARED:
                continue
            if isinstance(a[k], dict):
                out += [f"{k}.{kk}: store has {a[k].get(kk)!r}, this run {b[k].get(kk)!r}"
                        for kk in sorted(set(a[k]) | set(b[k])) if a[k].get(kk) != b[k].get(kk)]
            elif a[k] != b[k]:
                out.append(f"{k}: store has {a[k]!r}, this run {b[k]!r}")
        return out


def _is_local(path: str) -> bool:
    return "://" not in path


def _unfinished_creation(path: Path) -> bool:
    """True for a store whose creation was interrupted: no cae2 attribute (written last) and no units."""
    try:
        data = json.loads((path / "zarr.json").read_text())
        attrs = data.get("attributes", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return not any((path / "units").glob("*/zarr.json"))
    return ROOT_ATTR not in attrs and not any((path / "units").glob("*/zarr.json"))


def require_local_out(path: str) -> None:
    if not _is_local(path):
        raise UserError(f"--out {path}: target stores are written to a local or mounted file system path "
                        "(the writer relies on atomic renames); copy the finished store elsewhere afterwards")


class TargetStore:
    """A target store opened for reading (`open`) or for extraction (`create_or_validate`)."""

    def __init__(self, path: str | Path, group: zarr.Group, meta: StoreMeta):
        self.path = str(path)
        self.group = group
        self.meta = meta

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> TargetStore:
        path = str(path)
        if _is_local(path) and not (Path(path) / "zarr.json").is_file():
            raise UserError(f"target store {path} does not exist (no zarr.json); run `cae2 extract-targets` first")
        damaged = f"target store {path}: {path}/zarr.json is damaged"
        try:
            with naming(Path(path) / "zarr.json"):
                group = zarr.open_group(path, mode=mode)
                raw = group.attrs.get(ROOT_ATTR)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - zarr reports unreadable metadata in many types
            raise UserError(f"{damaged} ({type(e).__name__}: {str(e)[:160]}); restore it from a copy, or extract "
                            "into a new --out") from None
        if not raw:
            raise UserError(f"{path} is a Zarr group but not a cae2 target store (no '{ROOT_ATTR}' attribute)")
        if not isinstance(raw, dict):
            raise UserError(f"{damaged}: its '{ROOT_ATTR}' attribute is {raw!r}, not a store description; restore it "
                            "from a copy, or extract into a new --out")
        if raw.get("schema_version") not in READABLE_SCHEMAS:
            raise UserError(f"target store {path} has schema version {raw.get('schema_version')}, this cae2 "
                            f"reads {', '.join(map(str, READABLE_SCHEMAS))}; use the cae2 version that wrote "
                            f"it ({raw.get('cae2_version') or 'unknown'}) or rebuild it with this one")
        try:
            meta = StoreMeta.from_json(raw)
        except (TypeError, KeyError, ValueError) as e:
            raise UserError(f"{damaged}: its store description does not read ({e}); restore it from a copy, or "
                            "extract into a new --out") from None
        return cls(path, group, meta)

    @classmethod
    def check_settings(cls, path: str | Path, meta: StoreMeta) -> None:
        """Read-only: raise the error `create_or_validate` would raise for this path (not a local path,
        a store built with other settings, a directory that is not a store). Every rank calls this
        before anyone writes."""
        path = str(path)
        require_local_out(path)
        if not Path(path).exists():
            return
        creator, age = read_claim(claim_beside(path, "create"))
        if creator is not None and holder_alive(creator, age, 60):
            return  # another process is creating it; create_or_validate checks it once that is done
        if (Path(path) / "zarr.json").is_file():
            if not _unfinished_creation(Path(path)):
                diffs = cls.open(path).meta.differences(meta)
                if diffs:
                    raise UserError(f"target store {path} was built with other settings ({'; '.join(diffs)}); "
                                    "use a new --out, or rerun with the store's settings")
        elif any(Path(path).iterdir()):
            raise UserError(f"--out {path} exists and is not a cae2 target store; choose an empty or new directory")

    @classmethod
    def create_or_validate(cls, path: str | Path, meta: StoreMeta) -> TargetStore:
        """Create the store, or open an existing one whose settings equal `meta` (else a clear error).
        Processes that call this at once (independent jobs on one --out) take turns: one creates, the
        others then validate what it made."""
        path = str(path)
        lock = claim_beside(path, "create")
        me = Holder.me()
        deadline = time.monotonic() + 300
        while not try_claim(lock, me, stale_after=60)[0]:
            if time.monotonic() > deadline:
                raise UserError(f"--out {path}: another process has been creating this store for 5 minutes "
                                f"({lock}); remove that file if no process is")
            time.sleep(0.1)
        try:
            return cls._create_or_validate(path, meta)
        finally:
            release(lock, me)

    @classmethod
    def _create_or_validate(cls, path: str, meta: StoreMeta) -> TargetStore:
        cls.check_settings(path, meta)
        if (Path(path) / "zarr.json").is_file():
            if not _unfinished_creation(Path(path)):
                return cls.open(path, mode="r+")
            shutil.rmtree(path)  # a run killed while creating the store: nothing in it yet
        group = zarr.open_group(path, mode="w")
        group.require_group("units")
        group.attrs[ROOT_ATTR] = meta.to_json()  # written last: the store exists once this does
        return cls(path, group, meta)

    def remove_stale_partials(self) -> int:
        """Delete temp files of writes that a killed process left behind (zarr's LocalStore writes
        `<name>.<uuid>.partial`, then renames it). Creating a unit also (re)writes the metadata of the
        store and of `units/`, so those two folders can hold some; an incomplete unit is removed whole
        when it is redone. While another live process holds a claim on a unit of the store, only files
        older than five minutes go (a live writer's temp file lives for milliseconds)."""
        others = any(holder is not None and holder_alive(holder, age)
                     for holder, age in map(read_claim, claims_within(self.path)))
        older_than = 300.0 if others else -1.0
        now = time.time()
        stale = []
        for p in [*Path(self.path).glob("*.partial"), *(Path(self.path) / "units").glob("*.partial")]:
            try:
                if now - p.stat().st_mtime > older_than:
                    p.unlink()
                    stale.append(p)
            except FileNotFoundError:
                continue
        return len(stale)

    # --- units --------------------------------------------------------------------------------

    def unit_names(self) -> list[str]:
        """Every unit folder (complete, incomplete or damaged: `unit_state` tells which)."""
        if _is_local(self.path):  # a listing, so that one unreadable unit's metadata hides no other unit
            folder = Path(self.path) / "units"
            return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file()) if folder.is_dir() else []
        units = self.group.get("units")
        return sorted(units.group_keys()) if units is not None else []

    def marker(self, unit: str) -> dict | None:
        """The unit's completion marker, or None when the unit is missing, incomplete or damaged (its
        marker does not hold: `unit_state` says why)."""
        return self.unit_state(unit)[0]

    def unit_state(self, unit: str) -> tuple[dict | None, str | None]:
        """(marker, None) for a complete unit whose marker holds; (None, None) for a missing or incomplete
        one; (None, why) for a damaged one: its metadata cannot be read, or a file the marker lists is
        missing or has another size. A rerun of the command that wrote the unit redoes both."""
        folder = Path(self.path) / "units" / unit
        if not (folder / "zarr.json").is_file():
            return None, None
        try:
            with naming(folder / "zarr.json"):  # a failing disk is reported as such, not as a damaged unit
                marker = self.group[f"units/{unit}"].attrs.get(MARKER_ATTR)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            return None, f"its zarr.json cannot be read ({type(e).__name__}: {str(e)[:120]})"
        if marker is None:
            return None, None
        if not isinstance(marker, dict) or not isinstance(marker.get("num_samples"), int):
            return None, "its completion marker is not a marker cae2 writes"
        problem = _files_problem(folder, marker, self.meta.latent_format)
        return (None, problem) if problem else (marker, None)

    def claim_path(self, unit: str) -> Path:
        """The claim file of a unit: STORE/.claims/<unit>.claim (outside the zarr hierarchy)."""
        return claim_within(self.path, unit)

    def begin_unit(self, unit: str, source: str, keys: list[str], view_path: str = "pillow",
                   source_identity: dict | None = None) -> UnitWriter:
        """Start (or restart) a unit: an incomplete leftover is removed first. `source`: the shard's URL;
        `source_identity`: what tells that shard apart from another of the same name (its marker keeps it)."""
        with naming(Path(self.path) / "units" / unit):
            return self._begin_unit(unit, source, keys, view_path, source_identity)

    def _begin_unit(self, unit: str, source: str, keys: list[str], view_path: str,
                    source_identity: dict | None) -> UnitWriter:
        self._remove_unit(unit)
        m = self.meta
        n = len(keys)
        ug = self.group.require_group(f"units/{unit}")
        ug.attrs["source"] = source

        def per_view(name: str, dtype: str, view_shape: tuple[int, ...]) -> zarr.Array:
            return ug.create_array(name, shape=(n, m.views_per_image, *view_shape), dtype=dtype,
                                   chunks=(1, 1, *view_shape), shards=(m.images_per_shard, m.views_per_image,
                                                                        *view_shape),
                                   compressors=None, fill_value=0)

        int8 = m.latent_format == "int8"
        latents = per_view("latents", "int8" if int8 else "float16", (m.num_tokens, m.latent_dim))
        scales = per_view("scales", "float32", (m.num_tokens,)) if int8 else None
        direct = BlockFileWriter.for_array(latents, self.path, f"units/{unit}/latents")
        direct_scales = BlockFileWriter.for_array(scales, self.path, f"units/{unit}/scales") if int8 else None
        return UnitWriter(ug, Path(self.path) / "units" / unit, latents, keys, m.views_per_image, m.images_per_shard,
                          view_path, direct, scales, direct_scales, source_identity)

    def _remove_unit(self, unit: str) -> None:
        folder = Path(self.path) / "units" / unit  # stores are written on local paths only
        if folder.exists():
            shutil.rmtree(folder)

    def unit(self, unit: str) -> UnitReader:
        marker, problem = self.unit_state(unit)
        if problem:
            raise DamagedUnit(self.path, unit, problem)
        if marker is None:
            raise IncompleteUnit(f"target store {self.path}: unit {unit} is missing or incomplete; rerun "
                                 "`cae2 extract-targets` with the same options to finish it")
        with naming(Path(self.path) / "units" / unit):
            return UnitReader(self.group[f"units/{unit}"], self.path)


class IncompleteUnit(UserError):
    """A unit that is missing, or whose writer has not finished it (no completion marker)."""


class DamagedUnit(UserError):
    """A unit whose completion marker does not hold (files missing or cut short, unreadable metadata)."""

    def __init__(self, store: str, unit: str, problem: str):
        self.unit, self.problem = unit, problem
        super().__init__(f"target store {store}: unit {unit} is damaged: {problem}; rerun the command that wrote "
                         "it (extract-targets or convert-targets) with the same options: it redoes the unit")


REQUIRED_ARRAYS = ("latents", "keys", "valid", "view_int", "view_float", "image_hw")


def unit_files(folder: Path) -> dict[str, int | None]:
    """{path relative to the unit folder: size} of every file of a unit but its own zarr.json (which
    holds the marker): what a completion marker promises. Array metadata (zarr.json) is promised to
    exist, not its size: tools may rewrite it compatibly."""
    own = folder / "zarr.json"
    return {str(p.relative_to(folder)): None if p.name == "zarr.json" else p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p != own}


def _files_problem(folder: Path, marker: dict, latent_format: str) -> str | None:
    """Why the files of a unit do not hold what its marker promises, or None. Markers written before
    they listed files promise the arrays' metadata."""
    files = marker.get("files")
    if files is None:
        arrays = REQUIRED_ARRAYS + (("scales",) if latent_format == "int8" else ())
        files = {f"{a}/zarr.json": None for a in arrays if marker["num_samples"] or a == "latents"}
    for name, size in files.items():
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{folder / name} is missing"
        if size is not None and actual != size:
            return f"{folder / name} has {actual} bytes, its completion marker says {size}"
    return None


class UnitWriter:
    """Writes one unit: whole blocks of latents as rows complete, then metadata and the marker."""

    def __init__(self, group: zarr.Group, folder: Path, latents: zarr.Array, keys: list[str], k: int,
                 rows_per_block: int, view_path: str = "pillow", direct: BlockFileWriter | None = None,
                 scales: zarr.Array | None = None, direct_scales: BlockFileWriter | None = None,
                 source_identity: dict | None = None):
        self.group, self.folder = group, folder
        self.latents, self.scales = latents, scales
        self._direct = direct  # whole block files written as bytes (local stores); else through zarr
        self._direct_scales = direct_scales
        self.keys = keys
        n = len(keys)
        self.view_int = np.zeros((n, k, N_INT), np.int32)
        self.view_float = np.zeros((n, k, N_FLOAT), np.float32)
        self.image_hw = np.zeros((n, 2), np.int32)
        self.valid = np.zeros(n, bool)
        self.view_crc = np.zeros((n, k), np.uint32)  # crc32c of each view's stored bytes, checked on reads
        self.skipped: list[dict] = []
        self.host_decoded: list[dict] = []
        self.view_path = view_path
        self.source_identity = source_identity
        self.rows_per_block = rows_per_block
        self._checksum = LatentsChecksum()
        self._written = 0

    def set_view_params(self, row: int, view_int: np.ndarray, view_float: np.ndarray,
                        image_hw: tuple[int, int]) -> None:
        """Record the K views' parameters of a valid row (`ViewParams.to_record` of each)."""
        self.view_int[row], self.view_float[row], self.image_hw[row] = view_int, view_float, image_hw
        self.valid[row] = True

    def decoded_on_host(self, row: int, reason: str) -> None:
        """Record a row whose image Pillow decoded, not the store's device decoder (`targets.decoders`)."""
        self.host_decoded.append({"row": row, "reason": reason})

    def skip(self, row: int, key: str, reason: str) -> None:
        """Record a sample stage 1 could not use (its latents stay zero, `valid` False)."""
        self.skipped.append({"key": key, "row": row, "reason": reason})

    def copy_records(self, unit: UnitReader) -> None:
        """Take every row's view parameters, validity and skip records, and the identity of the shard they
        came from, from another store's unit."""
        self.valid[:], self.view_int[:], self.view_float[:], self.image_hw[:] = \
            unit.valid, unit.view_int, unit.view_float, unit.image_hw
        self.skipped = list(unit.marker["skipped"])
        self.host_decoded = list(unit.marker.get("decoded_on_host", []))
        self.source_identity = unit.marker.get("source_identity")

    def write_rows(self, start: int, latents: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Write rows [start, start + len) of latents (float16, or int8 with their float32 scales); must
        be whole blocks in order (the last one may be short)."""
        stop = start + len(latents)
        if start != self._written or (start % self.rows_per_block) or \
                (len(latents) != self.rows_per_block and stop != len(self.keys)):
            raise ValueError(f"rows {start}:{stop} are not the next whole block")
        if (scales is None) != (self.scales is None):
            raise ValueError("int8 latents are written with their scales, float16 latents without")
        parts = [(self.latents, self._direct, np.ascontiguousarray(latents, dtype=self.latents.dtype))]
        if scales is not None:
            parts.append((self.scales, self._direct_scales, np.ascontiguousarray(scales, dtype="<f4")))
        for r in range(len(latents)):
            for v in range(latents.shape[1]):
                self.view_crc[start + r, v] = view_checksum(parts[0][2][r, v], None if scales is None
                                                            else parts[1][2][r, v])
        for array, direct, values in parts:
            data = values.tobytes()
            with naming(self.folder / array.basename):
                if direct is not None:
                    direct.write(start // self.rows_per_block, data)
                else:
                    array[start:stop] = values
            self._checksum.update(data)
        self._written = stop

    def finish(self, source: str, quantization: dict | None = None, writer: dict | None = None) -> dict:
        """Write the small arrays, then the marker (last). `writer`: host, pid, job of the writing process."""
        if self._written != len(self.keys):
            raise ValueError(f"unit finished after {self._written} of {len(self.keys)} rows")
        with naming(self.folder):
            return self._finish(source, quantization, writer)

    def _finish(self, source: str, quantization: dict | None, writer: dict | None) -> dict:
        g = self.group
        n = len(self.keys)
        g.create_array("keys", shape=(n,), dtype=str)[:] = np.array(self.keys, dtype=str) if n else np.array([], str)
        for name, data in (("valid", self.valid), ("view_int", self.view_int), ("view_float", self.view_float),
                           ("image_hw", self.image_hw), ("view_crc32c", self.view_crc)):
            arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape if n else None)
            if n:
                arr[...] = data
        marker = {
            "num_samples": n,
            "files": unit_files(self.folder),
            "num_valid": int(self.valid.sum()),
            "skipped": sorted(self.skipped, key=lambda d: d["row"]),  # a device decoder's failures come later
            **({"decoded_on_host": sorted(self.host_decoded, key=lambda d: d["row"])} if self.host_decoded else {}),
            "checksum": self._checksum.value(),
            "source": source,
            **({"source_identity": self.source_identity} if self.source_identity else {}),
            "view_path": self.view_path,
            **({"writer": writer} if writer else {}),
            **({"quantization": quantization} if quantization else {}),
            "completed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        g.attrs[MARKER_ATTR] = marker  # last write: the unit counts only from here on
        return marker


def view_checksum(latents: np.ndarray, scales: np.ndarray | None = None) -> int:
    """crc32c of one view's stored bytes (latents, then int8 scales): ~8 us for a ViT-B/16 view."""
    crc = google_crc32c.value(np.ascontiguousarray(latents).tobytes())
    if scales is not None:
        crc = google_crc32c.extend(crc, np.ascontiguousarray(scales).tobytes())
    return crc


class CorruptTarget(UserError):
    """A cached view whose bytes differ from the ones written (their crc32c)."""


class UnitReader:
    """Read side of one complete unit, with the small arrays held in memory (O(N) per unit)."""

    def __init__(self, group: zarr.Group, store_path: str = ""):
        self.group = group
        self.marker = group.attrs[MARKER_ATTR]
        self.latents = group["latents"]
        self.scales = group.get("scales")  # int8 latents
        fast = store_path and self.latents.shape[0]
        self._fast = BlockFileReader.for_array(self.latents, store_path, f"{group.path}/latents") if fast else None
        self._fast_scales = BlockFileReader.for_array(self.scales, store_path, f"{group.path}/scales") \
            if fast and self.scales is not None else None
        self.keys = [str(k) for k in group["keys"][:]] if self.marker["num_samples"] else []
        n = len(self.keys)
        self.valid = group["valid"][:] if n else np.zeros(0, bool)
        self.view_int = group["view_int"][:] if n else np.zeros((0, 0, N_INT), np.int32)
        self.view_float = group["view_float"][:] if n else np.zeros((0, 0, N_FLOAT), np.float32)
        self.image_hw = group["image_hw"][:] if n else np.zeros((0, 2), np.int32)
        self.view_crc = group["view_crc32c"][:] if n and "view_crc32c" in group else None  # older units: none
        self.host_rows = frozenset(d["row"] for d in self.marker.get("decoded_on_host", ()))
        """Rows whose image Pillow decoded, where the store's decoder is a device decoder."""

    def __len__(self) -> int:
        return len(self.keys)

    def read_stored(self, row: int, view: int, check: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """One view as stored: (float16 [1 + T, D], None) or (int8 [1 + T, D], float32 scales [1 + T]).
        check: compare its crc32c with the one written (units made before checksums per view: no check)."""
        latents = self._fast.read(row, view) if self._fast is not None else self.latents[row, view]
        scales = None
        if self.scales is not None:
            scales = self._fast_scales.read(row, view) if self._fast_scales is not None else self.scales[row, view]
        if check and self.view_crc is not None and view_checksum(latents, scales) != self.view_crc[row, view]:
            raise CorruptTarget(f"target store unit {self.group.path.rsplit('/', 1)[-1]} row {row} (key "
                                f"{self.keys[row]}) view {view}: the cached latents differ from the ones written "
                                "(crc32c); run `cae2 verify-targets`, then delete the unit's folder and rerun "
                                "extract-targets to rewrite it")
        return latents, scales

    def read(self, row: int, view: int) -> np.ndarray:
        """Latents of one view: float16 [1 + T, D], or float32 dequantised from int8."""
        latents, scales = self.read_stored(row, view)
        if scales is None:
            return latents
        return dequantize(torch.from_numpy(latents), torch.from_numpy(scales)).numpy()

    def blocks(self):
        """(first row, latents [rows, K, 1 + T, D], scales [rows, K, 1 + T] or None) for each block of
        the unit, in row order, as stored."""
        step = self.latents.shards[0]
        for block, start in enumerate(range(0, len(self), step)):
            latents = self._fast.read_block(block) if self._fast is not None else self.latents[start:start + step]
            scales = None
            if self.scales is not None:
                scales = self._fast_scales.read_block(block) if self._fast_scales is not None \
                    else self.scales[start:start + step]
            yield start, latents, scales
