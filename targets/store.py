"""The target store: a self-describing Zarr v3 group of teacher latents keyed by view parameters.

Layout (see docs/cache.md):

    STORE/zarr.json                      attrs["cae2"]: schema, teacher, views, seed, K, grid, dims, ...
    STORE/.claims/<unit>.claim           the claim of the process writing a unit (targets.claims)
    STORE/.plans/<digest>.json           the units a job set out to write (for `cae2 inspect`)
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
targets by (shard name, position) and checks the key. Exactly one process writes a unit
(`targets.unit_writer`), every block of `latents` is written whole in one call, and the completion
marker (sample count, checksum, skipped samples) is written last: a unit without it is incomplete and
is redone. `targets.unit_reader` reads a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import zarr

from cae2.errors import UserError, naming
from targets.block_files import BlockFileWriter
from targets.claims import (
    Claim,
    Holder,
    claim_beside,
    claim_within,
    claims_within,
    holder_alive,
    read_claim,
    release,
    try_claim,
)
from targets.local_copies import copy_path, fetch
from targets.storage import Location, Meta
from targets.store_meta import READABLE_SCHEMAS, ROOT_ATTR, StoreMeta
from targets.unit_files import files_problem
from targets.unit_reader import MARKER_ATTR, UnitReader
from targets.unit_writer import UnitWriter
from targets.zarr_nodes import subgroup


def _unfinished_creation(path: Path) -> bool:
    """True for a store whose creation was interrupted: no cae2 attribute (written last) and no units."""
    try:
        data = json.loads((path / "zarr.json").read_text())
        attrs = data.get("attributes", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return not any((path / "units").glob("*/zarr.json"))
    return ROOT_ATTR not in attrs and not any((path / "units").glob("*/zarr.json"))


def _meta_of(path: str, raw: object) -> StoreMeta:
    """The store description in a root zarr.json's attributes, or a clear error."""
    damaged = f"target store {path}: {path}/zarr.json is damaged"
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
        return StoreMeta.from_json(raw)
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"{damaged}: its store description does not read ({e}); restore it from a copy, or "
                        "extract into a new --out") from None


def _remote_meta(where: Location) -> StoreMeta | None:
    """The description in an object-store store's root zarr.json; None when there is none."""
    try:
        data = json.loads((where / "zarr.json").get())
    except FileNotFoundError:
        return None
    except ValueError:
        raise UserError(f"target store {where}: {where}/zarr.json is damaged; restore it from a copy, or extract "
                        "into a new --out") from None
    return _meta_of(str(where), data.get("attributes", {}).get(ROOT_ATTR) if isinstance(data, dict) else None)


def _marker_in(path: Path) -> object:
    """The completion marker in a unit's zarr.json, read as plain JSON (zarr's group open costs ~0.5 ms more a
    unit: seconds when a store of thousands of units is opened)."""
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict) or data.get("zarr_format") != 3 or data.get("node_type") != "group":
        raise ValueError("not the metadata of a Zarr v3 group")
    attributes = data.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ValueError("its attributes are not an object")
    return attributes.get(MARKER_ATTR)


class TargetStore:
    """A target store opened for reading (`open`) or for extraction (`create_or_validate`), on a local path
    or in an object store. In an object store, zarr reads and writes the store's local mirror
    (`targets.local_copies`): a unit is written there whole, then uploaded, its zarr.json (with the
    completion marker) last, so an object-store unit is complete exactly when its zarr.json exists; a unit
    is read from its copies, fetched whole."""

    def __init__(self, path: str | Path, group: zarr.Group, meta: StoreMeta):
        self.path = str(path)
        self.location = Location.of(path)
        self.local = copy_path(self.location) if self.location.remote else Path(self.path)
        """Where zarr reads and writes: the store itself, or its local mirror."""
        self.group = group
        self.meta = meta
        self._listing: dict[str, dict[str, Meta]] | None = None

    @property
    def remote(self) -> bool:
        return self.location.remote

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, mode: Literal["r", "r+"] = "r") -> TargetStore:
        path = str(path)
        where = Location.of(path)
        if where.remote:
            return cls._open_remote(where, mode)
        if not (Path(path) / "zarr.json").is_file():
            raise UserError(f"target store {path} does not exist (no zarr.json); run `cae2 extract-targets` first")
        try:
            with naming(Path(path) / "zarr.json"):
                group = zarr.open_group(path, mode=mode)
                raw = group.attrs.get(ROOT_ATTR)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - zarr reports unreadable metadata in many types
            raise UserError(f"target store {path}: {path}/zarr.json is damaged ({type(e).__name__}: {str(e)[:160]}); "
                            "restore it from a copy, or extract into a new --out") from None
        return cls(path, group, _meta_of(path, raw))

    @classmethod
    def _open_remote(cls, where: Location, mode: Literal["r", "r+"]) -> TargetStore:
        """The store's root metadata copied into its mirror (fresh on every open), the mirror opened."""
        meta = _remote_meta(where)
        if meta is None:
            raise UserError(f"target store {where} does not exist (no zarr.json); run `cae2 extract-targets` first")
        local = copy_path(where)  # shared by the jobs of this host: each file replaced whole
        _replace(local / "zarr.json", (where / "zarr.json").get())
        _replace(local / "units" / "zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                                            "attributes": {}}).encode())
        return cls(str(where), zarr.open_group(str(local), mode=mode), meta)

    @classmethod
    def check_settings(cls, path: str | Path, meta: StoreMeta) -> None:
        """Read-only: raise the error `create_or_validate` would raise for this path (a store built with
        other settings, a directory that is not a store). Every rank calls this before anyone writes."""
        path = str(path)
        where = Location.of(path)
        if where.remote:
            found = _remote_meta(where)
            if found is None and where.children():
                raise UserError(f"--out {path} holds objects but is not a cae2 target store; choose an empty or new "
                                "prefix")
            diffs = found.differences(meta) if found is not None else []
            if diffs:
                raise UserError(f"target store {path} was built with other settings ({'; '.join(diffs)}); use a new "
                                "--out, or rerun with the store's settings")
            return
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
        others then validate what it made (in an object store: a conditional create of its zarr.json)."""
        path = str(path)
        where = Location.of(path)
        if where.remote:
            cls.check_settings(path, meta)
            if _remote_meta(where) is None:  # its metadata made in a folder of this process (the mirror is shared)
                with tempfile.TemporaryDirectory(prefix="cae2-store-") as made:
                    group = zarr.open_group(made, mode="w")
                    group.require_group("units")
                    group.attrs[ROOT_ATTR] = meta.to_json()
                    (where / "units" / "zarr.json").put((Path(made) / "units" / "zarr.json").read_bytes())
                    (where / "zarr.json").put((Path(made) / "zarr.json").read_bytes(), create=True)  # one job wins
            store = cls.open(path, mode="r+")
            diffs = store.meta.differences(meta)
            if diffs:
                raise UserError(f"target store {path} was built with other settings ({'; '.join(diffs)}); use a new "
                                "--out, or rerun with the store's settings")
            return store
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
        older than five minutes go (a live writer's temp file lives for milliseconds). Object stores have
        no partial objects: nothing to do."""
        if self.remote:
            return 0
        others = any(holder is not None and holder_alive(holder, age)
                     for holder, age in map(read_claim, claims_within(self.path)))
        older_than = 300.0 if others else -1.0
        now = time.time()
        stale = []
        for p in [*self.local.glob("*.partial"), *(self.local / "units").glob("*.partial")]:
            try:
                if now - p.stat().st_mtime > older_than:
                    p.unlink()
                    stale.append(p)
            except FileNotFoundError:
                continue
        return len(stale)

    # --- units --------------------------------------------------------------------------------

    def listing(self, refresh: bool = False) -> dict[str, dict[str, Meta]]:
        """Object stores: {unit: {file relative to the unit: its size, time, etag}}, kept until refreshed: the
        unit folders from one delimited listing of units/, then their objects in key ranges listed side by
        side (a LIST request per 1,000 objects; ~25 requests and a second for 1,282 units)."""
        if self._listing is None or refresh:
            units: dict[str, dict[str, Meta]] = {}
            folder = self.location / "units"
            for m in folder.list_folders(folder.children(folders_only=True)):
                unit, _, name = m.name.partition("/")
                if name:
                    units.setdefault(unit, {})[name] = m
            self._listing = units
        return self._listing

    def unit_names(self) -> list[str]:
        """Every unit folder (complete, incomplete or damaged: `unit_state` tells which)."""
        if self.remote:
            return sorted(self.listing())
        folder = self.local / "units"  # a listing, so that one unreadable unit's metadata hides no other unit
        return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file()) if folder.is_dir() else []

    def complete_names(self) -> set[str]:
        """Object stores: the units whose zarr.json (uploaded last) is there, from the listing alone."""
        return {u for u, files in self.listing().items() if "zarr.json" in files}

    def prefetch_markers(self, units: list[str]) -> None:
        """Object stores: the zarr.json (the marker) of these complete units copied side by side (32 requests in
        flight), so that reading their states costs no round trip each."""
        if not self.remote:
            return
        listing = self.listing()
        wanted = [(u, listing[u]["zarr.json"]) for u in units if "zarr.json" in listing.get(u, {})]
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(lambda um: fetch(self.location / "units" / um[0] / "zarr.json", um[1]), wanted))

    def is_complete(self, unit: str) -> bool:
        """Whether the unit is complete now (an object store: its zarr.json is there; one request)."""
        if self.remote:
            return (self.location / "units" / unit / "zarr.json").exists()
        return self.marker(unit) is not None

    def marker(self, unit: str) -> dict | None:
        """The unit's completion marker, or None when the unit is missing, incomplete or damaged (its
        marker does not hold: `unit_state` says why)."""
        return self.unit_state(unit)[0]

    def unit_state(self, unit: str) -> tuple[dict | None, str | None]:
        """(marker, None) for a complete unit whose marker holds; (None, None) for a missing or incomplete
        one; (None, why) for a damaged one: its metadata cannot be read, or a file the marker lists is
        missing or has another size. A rerun of the command that wrote the unit redoes both."""
        folder = self.local / "units" / unit
        remote_files = None
        if self.remote:
            remote_files = self.listing().get(unit, {})
            if "zarr.json" not in remote_files:
                return None, None
            fetch(self.location / "units" / unit / "zarr.json", remote_files["zarr.json"])
        if not (folder / "zarr.json").is_file():
            return None, None
        try:
            with naming(folder / "zarr.json"):  # a failing disk is reported as such, not as a damaged unit
                marker = _marker_in(folder / "zarr.json")
        except (KeyError, ValueError, TypeError, AttributeError, UserError) as e:
            return None, f"its zarr.json cannot be read ({type(e).__name__}: {str(e)[:120]})"
        if marker is None:
            return None, None
        if not isinstance(marker, dict) or not isinstance(marker.get("num_samples"), int):
            return None, "its completion marker is not a marker cae2 writes"
        sizes = {name: m.size for name, m in remote_files.items()} if remote_files is not None else None
        problem = files_problem(folder, marker, self.meta.latent_format, sizes, str(self.location / "units" / unit))
        return (None, problem) if problem else (dict(marker), None)

    def record_plan(self, units: list[str]) -> None:
        """Record the units a job means to write (STORE/.plans/<digest>.json, outside the zarr hierarchy), so
        that `cae2 inspect` can count the units not started yet. Jobs with the same shard list share one record."""
        text = json.dumps({"units": sorted(units), "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        name = hashlib.sha256("\n".join(sorted(units)).encode()).hexdigest()[:16] + ".json"
        if self.remote:
            (self.location / ".plans" / name).put(text.encode(), create=True)
        elif not (self.local / ".plans" / name).exists():
            with naming(self.local / ".plans" / name):
                _replace(self.local / ".plans" / name, text.encode())

    def planned_units(self) -> set[str] | None:
        """Every unit some job recorded it means to write; None when no job recorded a plan."""
        if self.remote:
            docs = [(self.location / ".plans" / m.name).get() for m in (self.location / ".plans").list()
                    if m.name.endswith(".json") and "/" not in m.name]
        else:
            docs = [p.read_bytes() for p in sorted((self.local / ".plans").glob("*.json"))]
        if not docs:
            return None
        planned: set[str] = set()
        for doc in docs:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                planned.update(map(str, json.loads(doc)["units"]))
        return planned

    def claim_path(self, unit: str) -> Claim:
        """The claim of a unit: STORE/.claims/<unit>.claim (outside the zarr hierarchy)."""
        return claim_within(self.location if self.remote else self.path, unit)

    def begin_unit(self, unit: str, source: str, keys: list[str], view_path: str = "pillow",
                   source_identity: dict | None = None, image_crc: list[int] | None = None) -> UnitWriter:
        """Start (or restart) a unit: an incomplete leftover is removed first. `source`: the shard's URL;
        `source_identity`: what tells that shard apart from another of the same name (its marker keeps it).
        In an object store the unit is written into the mirror; `publish_unit` uploads it."""
        with naming(self.local / "units" / unit):
            writer = self._begin_unit(unit, source, keys, view_path, source_identity)
        if image_crc is not None:
            writer.image_crc = np.array(image_crc, np.uint32)
        return writer

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
        local = str(self.local)
        direct = BlockFileWriter.for_array(latents, local, f"units/{unit}/latents")
        direct_scales = BlockFileWriter.for_array(scales, local, f"units/{unit}/scales") \
            if scales is not None else None
        return UnitWriter(ug, self.local / "units" / unit, latents, keys, m.views_per_image, m.images_per_shard,
                          view_path, direct, scales, direct_scales, source_identity)

    def publish_unit(self, unit: str) -> None:
        """Object stores: upload a finished unit from the mirror, its zarr.json (the marker) last."""
        if not self.remote:
            return
        folder, target = self.local / "units" / unit, self.location / "units" / unit

        def upload(p: Path) -> None:
            with naming(p):
                (target / str(p.relative_to(folder))).upload(p)

        files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / "zarr.json")
        with ThreadPoolExecutor(max_workers=8) as pool:  # the arrays side by side, the marker once they are all in
            list(pool.map(upload, files))
        upload(folder / "zarr.json")

    def _remove_unit(self, unit: str) -> None:
        folder = self.local / "units" / unit
        if folder.exists():
            shutil.rmtree(folder)

    def unit(self, unit: str) -> UnitReader:
        marker, problem = self.unit_state(unit)
        if problem:
            raise DamagedUnit(self.path, unit, problem)
        if marker is None:
            raise IncompleteUnit(f"target store {self.path}: unit {unit} is missing or incomplete; rerun "
                                 "`cae2 extract-targets` with the same options to finish it")
        if self.remote:  # its files copied whole, side by side (a copy already made is kept)
            files = self.listing()[unit].items()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda f: fetch(self.location / "units" / unit / f[0], f[1]), files))
        with naming(self.local / "units" / unit):
            return UnitReader(subgroup(self.group, f"units/{unit}"), str(self.local))


def _replace(path: Path, data: bytes) -> None:
    """Write a file whole: through a name of this process beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class IncompleteUnit(UserError):
    """A unit that is missing, or whose writer has not finished it (no completion marker)."""


class DamagedUnit(UserError):
    """A unit whose completion marker does not hold (files missing or cut short, unreadable metadata)."""

    def __init__(self, store: str, unit: str, problem: str):
        self.unit, self.problem = unit, problem
        super().__init__(f"target store {store}: unit {unit} is damaged: {problem}; rerun the command that wrote "
                         "it (extract-targets or convert-targets) with the same options: it redoes the unit")
