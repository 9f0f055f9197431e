"""`cae2 convert-targets SRC DST --latent-format int8`: an fp16 target store rewritten as int8 + scales.

The source is only read. Each unit of DST is written by the one process converting it, shard by
shard, with the error of its int8 latents against the source's float16 latents in its completion
marker (written last), so an interrupted conversion resumes where it stopped: complete units are
kept, an incomplete one is redone. The int8 bytes equal those of a store extracted as int8 with the
same settings (both quantise the same float16 latents).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Annotated

import torch

import cae2
from cae2.errors import UserError
from cae2.fields import Argument
from targets.cache import TargetStore, require_local_out
from targets.quantize import LATENT_FORMATS, QuantStats, quantize, token_errors


@dataclass(kw_only=True)
class ConvertConfig:
    """Every option of `cae2 convert-targets`."""

    src: Annotated[str, Argument()]
    """An fp16 target store (only read)."""
    dst: Annotated[str, Argument()]
    """The new store; rerun to resume."""
    latent_format: str = "int8"
    """int8: one float32 scale per token."""
    min_cosine: float = 0.999
    """Fail a unit whose token cosine to the source falls below this."""


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

    def summary(self) -> str:
        lines = [f"units: {self.units_done} converted, {self.units_already_complete} already complete, "
                 f"{len(self.units_failed)} failed",
                 f"views: {self.views}  read: {self.bytes_read / 2**20:.1f} MiB  written: "
                 f"{self.bytes_written / 2**20:.1f} MiB ({self.bytes_written / max(self.bytes_read, 1):.3f} of the "
                 f"source)  time: {self.seconds:.1f}s"]
        if self.quant.tokens:
            lines.append(self.quant.summary().replace("the teacher", "the source's float16 latents"))
        return "\n".join(lines + [f"FAILED: {m}" for m in self.units_failed])


def convert_store(cfg: ConvertConfig, log=print) -> ConvertStats:
    src, dst, latent_format, min_cosine = cfg.src, cfg.dst, cfg.latent_format, cfg.min_cosine
    if latent_format != "int8":
        raise UserError(f"--latent-format: convert-targets writes int8 stores (one of {', '.join(LATENT_FORMATS)} "
                        f"is the source's); got {latent_format!r}")
    require_local_out(dst)
    source = TargetStore.open(src)
    if source.meta.latent_format != "fp16":
        raise UserError(f"{src} already holds {source.meta.latent_format} latents; convert-targets reads fp16 stores")
    if str(src).rstrip("/") == str(dst).rstrip("/"):
        raise UserError("convert-targets writes a new store: DST must differ from SRC (the source stays untouched)")
    meta = replace(source.meta, latent_format="int8", cae2_version=cae2.__version__)
    target = TargetStore.create_or_validate(dst, meta)
    target.remove_stale_partials()
    names = [n for n in source.unit_names() if source.marker(n) is not None]
    skipped_incomplete = len(source.unit_names()) - len(names)
    if skipped_incomplete:
        log(f"convert-targets: {skipped_incomplete} incomplete unit(s) of {src} are left out; finish them with "
            "extract-targets and rerun")
    stats = ConvertStats()
    t0 = time.perf_counter()
    for name in names:
        if target.marker(name) is not None:
            stats.units_already_complete += 1
            continue
        _convert_unit(source, target, name, min_cosine, stats)
    stats.seconds = time.perf_counter() - t0
    return stats


def _convert_unit(source: TargetStore, target: TargetStore, name: str, min_cosine: float, stats: ConvertStats) -> None:
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
    writer.finish(marker["source"], quant.record() | {"against": "source float16 latents"})
    stats.units_done += 1
    stats.quant.merge(quant)
