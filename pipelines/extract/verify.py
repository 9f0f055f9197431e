"""`cae2 verify-targets`: check that a target store is complete, consistent and faithful."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cae2.errors import UserError
from cae2.fields import Argument, PathKind, Range
from pipelines.shards import expand_shards, image_bytes, iter_shard, required_image_bytes
from targets.block_files import LatentsChecksum, view_checksum
from targets.decoders import decode_on_device
from targets.storage_settings import StorageSettings
from targets.store import DamagedUnit, IncompleteUnit, TargetStore
from targets.teacher import teacher_for_store
from targets.views import ViewParams, ViewSettings, apply_view, decode_image, measure_view, sample_view

RERUN = ("rerun the command that wrote the store (extract-targets or convert-targets) with the same options: it "
         "redoes the unit")
DELETE_AND_RERUN = ("delete its folder (units/{unit}) and rerun the command that wrote the store with the same "
                    "options: a rerun alone keeps a unit whose marker holds")


@dataclass(kw_only=True)
class VerifyConfig(StorageSettings):
    """Every option of `cae2 verify-targets`."""

    store: Annotated[str, Argument(), PathKind("dir")]
    """Target store to check."""
    shards: str | None = None
    """Shards the store must cover (counts and keys)."""
    recompute: Annotated[int, Range(min=0)] = 0
    """Recompute N random views with the teacher."""
    pretrained: str | None = None
    """Teacher weights file, if moved since extraction."""


@dataclass
class VerifyReport:
    units: int = 0
    images: int = 0
    views: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    recomputed: int = 0
    max_abs_err: float = 0.0
    min_cosine: float = 1.0
    decoded_by: str = ""
    """The decoder the recomputed views' images came from, when it is not the store's."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"units: {self.units}  images: {self.images}  views: {self.views}  skipped: {self.skipped}"]
        if self.recomputed:
            lines.append(f"recomputed {self.recomputed} views with the teacher: max abs error {self.max_abs_err:.3g}, "
                         f"min cosine {self.min_cosine:.6f}"
                         + (f" (images decoded by {self.decoded_by}: no GPU here for the store's decoder)"
                            if self.decoded_by else ""))
        lines += [f"PROBLEM: {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"... and {len(self.problems) - 50} more problems")
        lines.append("verify: OK" if self.ok else f"verify: FAILED ({len(self.problems)} problems)")
        return "\n".join(lines)


def verify_store(path: str, shards: str | None = None, recompute: int = 0, pretrained: str | None = None,
                 min_cosine: float = 0.999, seed: int = 0) -> VerifyReport:
    store = TargetStore.open(path)
    meta = store.meta
    settings = ViewSettings.from_dict(meta.views)
    report = VerifyReport()
    shard_list = expand_shards(shards) if shards else None
    names = [s.name for s in shard_list] if shard_list else store.unit_names()
    if "://" not in path:
        stale = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*.partial"))
        report.problems += [f"unfinished write left behind: {p} (rerun extract-targets to clean up)" for p in stale]
    units = {}
    for name in names:
        try:
            unit = store.unit(name)  # checks that its marker holds
            report.units += 1
            _check_unit(name, unit, meta, settings, report)
            units[name] = unit
        except DamagedUnit as e:
            report.problems.append(f"unit {name} is damaged: {e.problem}; {RERUN}")
        except IncompleteUnit:
            report.problems.append(f"unit {name} is missing or incomplete; {RERUN}")
        except (UserError, OSError, ValueError, KeyError) as e:  # a unit that cannot be read is listed, not fatal
            report.problems.append(f"unit {name} cannot be read ({e}); {DELETE_AND_RERUN.format(unit=name)}")
    for shard in shard_list or []:
        if shard.name in units:
            unit = units[shard.name]
            samples = list(iter_shard(shard.url))
            if [s["__key__"] for s in samples] != unit.keys:
                report.problems.append(f"unit {shard.name}: {len(unit.keys)} cached samples do not "
                                       f"match the {len(samples)} samples of {shard.url}")
                continue
            for row in np.flatnonzero(unit.valid):  # each image is the one the targets were made from
                changed = unit.image_changed(int(row), image_bytes(samples[row]) or b"")
                if changed:
                    report.problems.append(f"{changed}; restore the shard, or make a store of these shards")
    if recompute:
        if not shard_list:
            report.problems.append("--recompute needs --shards to read the images")
        else:
            _recompute(store, shard_list, recompute, pretrained, min_cosine, seed, report)
    return report


def _check_unit(name: str, unit, meta, settings: ViewSettings, report: VerifyReport) -> None:
    problem = _shape_problem(name, unit, meta)
    if problem:
        report.problems.append(problem)
        return
    n, valid = len(unit), int(unit.valid.sum())
    report.images += valid
    report.views += valid * meta.views_per_image
    report.skipped += n - valid
    if len(unit.marker["skipped"]) != n - valid:
        report.problems.append(f"unit {name}: {n - valid} invalid rows but {len(unit.marker['skipped'])} skip records")
    _check_latents(name, unit, report)
    _check_view_params(name, unit, meta, settings, report)


def _shape_problem(name: str, unit, meta) -> str | None:
    """What is wrong with the unit's array shapes and types, if anything."""
    n = len(unit)
    if unit.marker["num_samples"] != n or unit.latents.shape[0] != n:
        return f"unit {name}: marker says {unit.marker['num_samples']} samples, arrays hold {n}"
    expected = (n, meta.views_per_image, meta.num_tokens, meta.latent_dim)
    dtype = np.int8 if meta.latent_format == "int8" else np.float16
    if unit.latents.shape != expected or unit.latents.dtype != dtype:
        return (f"unit {name}: latents are {unit.latents.shape} {unit.latents.dtype}, expected {expected} "
                f"{np.dtype(dtype).name}")
    if dtype == np.int8 and (unit.scales is None or unit.scales.shape != expected[:3]):
        return (f"unit {name}: int8 latents need scales {expected[:3]}, found "
                f"{None if unit.scales is None else unit.scales.shape}")
    return None


def _check_latents(name: str, unit, report: VerifyReport) -> None:
    """Per-view checksums, the unit's checksum, and finite, written values."""
    marker = unit.marker
    try:
        digest = LatentsChecksum.like(marker["checksum"])
    except ValueError as e:
        digest = None
        report.problems.append(f"unit {name}: {e}")
    for start, block, scales in unit.blocks():
        step = len(block)
        if unit.view_crc is not None:
            for r, v in zip(*np.nonzero(unit.valid[start:start + step, None] & np.ones(block.shape[1], bool)),
                            strict=True):
                if view_checksum(block[r, v], None if scales is None else scales[r, v]) != unit.view_crc[start + r, v]:
                    report.problems.append(f"unit {name} row {start + r} (key {unit.keys[start + r]}) view {v}: the "
                                           "stored latents differ from their checksum (crc32c); "
                                           + DELETE_AND_RERUN.format(unit=name))
        if digest is not None:
            digest.update(block.tobytes())
            if scales is not None:
                digest.update(scales.tobytes())
        bad = ~np.isfinite(block).all(axis=(1, 2, 3))
        if scales is not None:
            bad |= ~np.isfinite(scales).all(axis=(1, 2))
        for r in np.flatnonzero(bad):
            report.problems.append(f"unit {name} row {start + r} (key {unit.keys[start + r]}): NaN or inf latents")
        zero = unit.valid[start:start + step] & ~block.any(axis=(1, 2, 3))
        for r in np.flatnonzero(zero):
            report.problems.append(f"unit {name} row {start + r}: latents are all zero (never written)")
    if digest is not None and digest.value() != marker["checksum"]:
        report.problems.append(f"unit {name}: latents checksum differs from the completion marker; "
                               + DELETE_AND_RERUN.format(unit=name))


def _check_view_params(name: str, unit, meta, settings: ViewSettings, report: VerifyReport) -> None:
    """Every valid view's parameters fit its image and equal the ones (seed, key, view) regenerate."""
    for row in np.flatnonzero(unit.valid):
        hw = (int(unit.image_hw[row, 0]), int(unit.image_hw[row, 1]))
        for k in range(meta.views_per_image):
            p = ViewParams.from_record(unit.view_int[row, k], unit.view_float[row, k])
            issues = p.check(hw, settings)
            if not issues and replace(p, contrast_mean=None) != sample_view(settings, meta.seed, unit.keys[row], k, hw):
                issues = ["parameters differ from the ones regenerated from (seed, key, view)"]
            report.problems += [f"unit {name} row {row} view {k}: {i}" for i in issues]


def _recompute(store: TargetStore, shard_list, count: int, pretrained, min_cosine: float, seed: int,
               report: VerifyReport) -> None:
    meta = store.meta
    units = {s.name: store.unit(s.name) for s in shard_list if store.marker(s.name) is not None}
    candidates = [(s, row) for s in shard_list if s.name in units for row in np.flatnonzero(units[s.name].valid)]
    if not candidates:
        return
    rng = np.random.default_rng(seed)
    picks = sorted((candidates[i] for i in rng.choice(len(candidates), min(count, len(candidates)), replace=False)),
                   key=lambda c: (c[0].name, c[1]))
    try:
        teacher = teacher_for_store(meta.teacher, meta.input_size, "cuda" if torch.cuda.is_available() else "cpu",
                                    pretrained)
    except UserError as e:
        report.problems.append(str(e))
        return
    by_shard: dict = {}
    for shard, row in picks:
        by_shard.setdefault(shard, []).append(int(row))
    for shard, rows in by_shard.items():
        unit = units[shard.name]
        wanted = set(rows)
        for row, sample in enumerate(iter_shard(shard.url)):
            if row not in wanted:
                continue
            k = int(rng.integers(meta.views_per_image))
            image, exact = _decode_like_store(required_image_bytes(sample), row, unit, meta.decoder, report)
            p = ViewParams.from_record(unit.view_int[row, k], unit.view_float[row, k])
            measured = measure_view(replace(p, contrast_mean=None), image).contrast_mean
            if p.contrast_mean is not None and p.contrast_mean != measured and exact:
                report.problems.append(f"unit {shard.name} row {row} view {k}: stored contrast mean "
                                       f"{p.contrast_mean} differs from the image's {measured}")
            view = apply_view(image, p, meta.input_size, meta.interpolation)
            fresh = teacher(view[None])[0]
            cached = torch.from_numpy(unit.read(row, k).astype(np.float32))
            report.max_abs_err = max(report.max_abs_err, (fresh - cached).abs().max().item())
            report.min_cosine = min(report.min_cosine, F.cosine_similarity(fresh, cached, dim=-1).min().item())
            report.recomputed += 1
    if report.min_cosine < min_cosine:
        report.problems.append(f"recomputed targets differ from the cache: min cosine {report.min_cosine:.6f} < "
                               f"{min_cosine}")


def _decode_like_store(data: bytes, row: int, unit, decoder: str, report: VerifyReport) -> tuple[Image.Image, bool]:
    """The image as the store's decoder decoded it -> (image, whether these are exactly its pixels). nvJPEG
    stores need a GPU for that; without one Pillow's pixels stand in (said in the report)."""
    if decoder != "nvjpeg" or row in unit.host_rows:
        return decode_image(data), True
    if torch.cuda.is_available():
        pixels = decode_on_device([torch.frombuffer(bytearray(data), dtype=torch.uint8)], "cuda")[0]
        return Image.fromarray(pixels.cpu().numpy()), True
    report.decoded_by = "pillow"
    return decode_image(data), False
