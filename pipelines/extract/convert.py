"""`cae2 convert-targets SRC DST --latent-format int8`: an fp16 target store rewritten as int8 + scales.

The source is only read. Each unit of DST is written by the one process that claims it, block by
block, with the error of its int8 latents against the source's float16 latents in its completion
marker (written last), so an interrupted conversion resumes where it stopped: complete units are
kept, an incomplete one is redone. The int8 bytes equal those of a store extracted as int8 with the
same settings (both quantise the same float16 latents).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Annotated

import torch

import cae2
from cae2.errors import UserError
from cae2.fields import Argument, OneOf, PathKind, Range
from pipelines.logs import Progress
from pipelines.runs import process_state
from targets.claims import Heartbeat, Holder, release, try_claim
from targets.quantize import QuantStats, quantize, token_errors
from targets.storage import same_place
from targets.storage_settings import StorageSettings
from targets.store import TargetStore

logger = logging.getLogger(__name__)

@dataclass(kw_only=True)
class ConvertConfig(StorageSettings):
    """Every option of `cae2 convert-targets`."""

    src: Annotated[str, Argument(), PathKind("dir")]
    """An fp16 target store (only read)."""
    dst: Annotated[str, Argument(), PathKind("out_dir")]
    """The new store; rerun to resume."""
    latent_format: Annotated[str, OneOf(("int8",))] = "int8"
    """int8: one float32 scale per token."""
    min_cosine: Annotated[float, Range(0, 1)] = 0.999
    """Fail a unit whose token cosine to the source falls below this."""
    progress: bool = True
    """Show progress (a bar on a terminal, a status line every 30 s in a log file)."""


@dataclass
class ConvertStats:
    units_done: int = 0
    units_already_complete: int = 0
    units_failed: list[str] = field(default_factory=list)
    views: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    quant: QuantStats = field(default_factory=QuantStats)
    units_elsewhere: list[str] = field(default_factory=list)
    """Units another live process was writing (skipped)."""

    @classmethod
    def merged(cls, all_stats: list[ConvertStats]) -> ConvertStats:
        total = cls()
        for s in all_stats:
            for name in ("units_done", "units_already_complete", "views", "bytes_read", "bytes_written"):
                setattr(total, name, getattr(total, name) + getattr(s, name))
            total.units_failed += s.units_failed
            total.units_elsewhere += s.units_elsewhere
            total.seconds = max(total.seconds, s.seconds)
            total.quant.merge(s.quant)
        return total

    def summary(self) -> str:
        lines = [f"units: {self.units_done} converted, {self.units_already_complete} already complete, "
                 f"{len(self.units_failed)} failed",
                 f"views: {self.views}  read: {self.bytes_read / 2**20:.1f} MiB  written: "
                 f"{self.bytes_written / 2**20:.1f} MiB ({self.bytes_written / max(self.bytes_read, 1):.3f} of the "
                 f"source)  time: {self.seconds:.1f}s"]
        if self.units_elsewhere:
            lines.append(f"units being written by other processes (skipped; rerun when they are done to check): "
                         f"{len(self.units_elsewhere)}")
            lines += [f"  {m}" for m in self.units_elsewhere[:20]]
        if self.quant.tokens:
            lines.append(self.quant.summary().replace("the teacher", "the source's float16 latents"))
        return "\n".join(lines + [f"FAILED: {m}" for m in self.units_failed])


def convert_store(cfg: ConvertConfig) -> ConvertStats:
    """Convert every complete unit of SRC that DST lacks. Each unit is claimed first (targets.claims), so
    several converts, a multi-rank launch, or a convert beside an int8 extraction into the same DST share
    the units, each written once; a complete unit of DST made from another shard is refused first."""
    source, target = _open_stores(cfg)
    names = [n for n in source.unit_names() if source.marker(n) is not None]
    if len(names) < len(source.unit_names()):
        logger.warning(f"convert-targets: {len(source.unit_names()) - len(names)} incomplete unit(s) of {cfg.src} are "
                       "left out; finish them with extract-targets and rerun")
    _check_reuse(source, target, names)
    state = process_state()
    if state.is_main_process:
        target.record_plan(names)  # `cae2 inspect DST` counts the units not converted yet
    names = names[state.process_index:] + names[:state.process_index]  # ranks start apart
    stats, holder, heartbeat = ConvertStats(), Holder.me(), Heartbeat()
    progress = Progress(len(names), unit="unit", enabled=cfg.progress and state.is_main_process,
                        name="convert-targets")
    t0 = time.perf_counter()
    try:
        for name in names:
            _claim_and_convert(source, target, name, cfg.min_cosine, stats, holder, heartbeat)
            progress.update(1, note=f"{stats.units_done} converted here")
    finally:
        heartbeat.stop()
        progress.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _claim_and_convert(source: TargetStore, target: TargetStore, name: str, min_cosine: float, stats: ConvertStats,
                       holder: Holder, heartbeat: Heartbeat) -> None:
    """Convert one unit unless another process holds it or it is complete already."""
    claim = target.claim_path(name)
    got, other = try_claim(claim, holder)
    if not got:
        stats.units_elsewhere.append(f"{name}: being written by {other.describe() if other else 'a process'}")
        return
    try:
        if target.marker(name) is not None:
            stats.units_already_complete += 1
            return
        heartbeat.add(claim)
        _convert_unit(source, target, name, min_cosine, stats, holder)
    finally:
        heartbeat.discard(claim)
        release(claim, holder)


def _open_stores(cfg: ConvertConfig) -> tuple[TargetStore, TargetStore]:
    source = TargetStore.open(cfg.src)
    if source.meta.latent_format != "fp16":
        raise UserError(f"{cfg.src} already holds {source.meta.latent_format} latents; convert-targets reads fp16 "
                        "stores")
    if same_place(cfg.src, cfg.dst):
        raise UserError("convert-targets writes a new store: DST must differ from SRC (the source stays untouched)")
    meta = replace(source.meta, latent_format="int8", cae2_version=cae2.__version__, written_by="convert-targets")
    target = TargetStore.create_or_validate(cfg.dst, meta)  # concurrent converts take turns creating it
    target.remove_stale_partials()
    return source, target


def _check_reuse(source: TargetStore, target: TargetStore, names: list[str]) -> None:
    """Refuse a DST whose complete units were made from other shards than SRC's units of the same name."""
    for name in names:
        done = target.marker(name)
        if done is None:
            continue
        ours, theirs = (source.marker(name) or {}).get("source_identity"), done.get("source_identity")
        same = ours == theirs if ours and theirs else source.unit(name).keys == target.unit(name).keys
        if not same:
            raise UserError(f"{target.path}: its complete unit {name} was made from another shard than unit {name} of "
                            f"{source.path} ({theirs or 'other keys'} vs {ours or 'these keys'}); convert into a new "
                            "DST, or remove that unit's folder to have it redone")


def _convert_unit(source: TargetStore, target: TargetStore, name: str, min_cosine: float, stats: ConvertStats,
                  holder: Holder) -> None:
    unit = source.unit(name)
    marker = unit.marker
    writer = target.begin_unit(name, marker["source"], unit.keys, marker.get("view_path", "pillow"))
    writer.copy_records(unit)
    quant = QuantStats()
    for start, block, _ in unit.blocks():
        x = torch.from_numpy(block)
        q, scales = quantize(x)
        cos, err = token_errors(x, q, scales)
        for r in range(len(block)):
            if unit.valid[start + r]:
                quant.add(cos[r], err[r], unit.keys[start + r], start + r)
        writer.write_rows(start, q.numpy(), scales.numpy())
        stats.bytes_read += block.nbytes
        stats.bytes_written += q.numpy().nbytes + scales.numpy().nbytes
        stats.views += int(unit.valid[start:start + len(block)].sum()) * block.shape[1]
    failure = quant.failure(name, min_cosine, "the source", "rerun with a lower --min-cosine")
    if failure:
        stats.units_failed.append(failure)
        return
    writer.finish(marker["source"], quant.record() | {"against": "source float16 latents"},
                  writer={"host": holder.host, "pid": holder.pid, "job": holder.job})
    target.publish_unit(name)  # object stores: uploaded now, the marker last
    stats.units_done += 1
    stats.quant.merge(quant)
