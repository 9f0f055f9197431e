"""Stage 1: run the frozen teacher once over K views of every image and fill the target store.

Data flow on each rank (whole shards = units, `shards[rank::world]`):

    data-loader workers (stream.py): claim a unit, read its whole shard -> decode each image once ->
        draw its K views and measure their contrast means -> Pillow view path: cut the views;
        device view path: hand on the decoded image -> yield per image (or a skip record)
    main process (Extraction): device view path: cut the views of a batch on the teacher's device
        (targets.device_views, bit-identical) -> teacher forward of batch i on the device while the
        host prepares batch i + 1 (teacher_queue.py) -> float16 (or int8) latents -> UnitAssembler
    writer thread: whole blocks (zarr shard files) of each unit as their rows complete, then the
        unit's marker, then its claim goes

Complete units are skipped on a rerun; an incomplete one is removed and redone. A worker claims a
unit (targets.claims) before it reads it, so several jobs can run the same command on one store and
share the units, each written once: a unit another live process holds is skipped and reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

import cae2
from cae2.errors import UserError
from pipelines.extract.assemble import UnitAssembler
from pipelines.extract.config import ExtractConfig
from pipelines.extract.stream import ImageViews, NotMine, ShardError, Skip, UnitStart, UnitViewStream, ViewRecipe
from pipelines.extract.teacher_queue import TeacherQueue, cut_views, decode_jpegs
from pipelines.logs import Progress
from pipelines.runs import init_worker, process_state
from pipelines.shards import Shard, expand_shards, shard_changed
from targets.claims import Heartbeat, Holder, claims_within, release
from targets.decoders import device_decoder_name, require_device_view_path
from targets.device_views import DeviceViews, Packer
from targets.quantize import QuantStats
from targets.storage import worker_context
from targets.store import TargetStore
from targets.store_meta import StoreMeta
from targets.teacher import Teacher
from targets.view_paths import resolve_view_path, where_views_are_cut

logger = logging.getLogger(__name__)

@dataclass
class ExtractStats:
    units_done: int = 0
    units_already_complete: int = 0
    units_failed: list = field(default_factory=list)
    images: int = 0
    views: int = 0
    skipped: Counter = field(default_factory=Counter)
    bytes_written: int = 0
    seconds: float = 0.0
    quant: QuantStats = field(default_factory=QuantStats)
    units_elsewhere: list = field(default_factory=list)
    """Units another live process was writing (skipped)."""

    @classmethod
    def merged(cls, all_stats: list[ExtractStats]) -> ExtractStats:
        """The stats of every rank as one."""
        total = cls()
        for s in all_stats:
            total.units_done += s.units_done
            total.units_already_complete += s.units_already_complete
            total.units_failed += s.units_failed
            total.images += s.images
            total.views += s.views
            total.skipped.update(s.skipped)
            total.bytes_written += s.bytes_written
            total.seconds = max(total.seconds, s.seconds)
            total.quant.merge(s.quant)
            total.units_elsewhere += s.units_elsewhere
        return total

    def summary(self, ranks: int) -> str:
        rate = self.views / self.seconds if self.seconds else 0.0
        reasons = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        skipped = ", ".join(f"{n} {reason}" for reason, n in reasons[:5]) or "none"
        if len(reasons) > 5:
            skipped += f", and {len(reasons) - 5} more reasons (each unit's marker lists its skipped keys)"
        lines = [
            f"units: {self.units_done} written, {self.units_already_complete} already complete, "
            f"{len(self.units_failed)} failed",
            f"images: {self.images}  views: {self.views}  skipped: {sum(self.skipped.values())} ({skipped})",
            f"written: {self.bytes_written / 2**20:.1f} MiB  time: {self.seconds:.1f}s  "
            f"throughput: {rate:.1f} views/s over {ranks} rank(s)",
        ]
        if self.units_elsewhere:
            lines.append(f"units being written by other processes (skipped; rerun when they are done to check): "
                         f"{len(self.units_elsewhere)}")
            lines += [f"  {m}" for m in self.units_elsewhere[:20]]
        if self.quant.tokens:
            lines.append(self.quant.summary())
        lines += [f"FAILED: {m}" for m in self.units_failed]
        return "\n".join(lines)


def store_meta(cfg: ExtractConfig, teacher: Teacher, view_path: str) -> StoreMeta:
    return StoreMeta(teacher=teacher.identity().to_json(), views=cfg.views.to_dict(), seed=cfg.seed,
                     views_per_image=cfg.views_per_image, input_size=teacher.image_size,
                     grid=(teacher.grid_size[0], teacher.grid_size[1]),
                     num_tokens=teacher.num_tokens, latent_dim=teacher.dim, mean=teacher.mean, std=teacher.std,
                     interpolation=teacher.interpolation, images_per_shard=cfg.images_per_shard,
                     latent_format=cfg.latent_format, view_path=view_path, cae2_version=cae2.__version__,
                     decoder="pillow" if cfg.decoder == "host" else device_decoder_name(teacher.device))


def open_store_for_run(cfg: ExtractConfig, meta: StoreMeta, state) -> TargetStore:
    """Every rank refuses a clashing store before anyone writes; then rank 0 creates a new store (or
    clears a half-created one) while the others wait, and they open it after."""
    TargetStore.check_settings(cfg.out, meta)  # read-only, so ranks may run it side by side
    state.wait_for_everyone()  # no rank inspects the store while rank 0 creates it
    if state.is_main_process:
        store = TargetStore.create_or_validate(cfg.out, meta)
        store.remove_stale_partials()  # left by a killed run; nobody writes before the barrier below
    state.wait_for_everyone()
    if not state.is_main_process:
        store = TargetStore.open(cfg.out, mode="r+")
    return store


def units_to_do(store: TargetStore, shards: list[Shard]) -> list[Shard]:
    """The shards whose units are not complete (damaged ones are redone, and said so); a complete unit made
    from another shard of the same name is refused before any work. In an object store one listing tells
    the units and their files, and the markers of the complete ones are read side by side (once per host:
    their local copies are kept while the listing says they are unchanged)."""
    checked = shards
    todo = []
    if store.remote:
        complete = store.complete_names()
        todo = [s for s in shards if s.name not in complete]
        checked = [s for s in shards if s.name in complete]
        store.prefetch_markers([s.name for s in checked])
    for shard in checked:
        marker, damage = store.unit_state(shard.name)
        if marker is None:
            if damage:
                logger.info(f"redoing unit {shard.name}: it is damaged ({damage})")
            todo.append(shard)
            continue
        changed = shard_changed(marker.get("source_identity"), shard.url)
        if changed:
            raise UserError(f"--shards: {shard.url} is not the shard unit {shard.name} of {store.path} was made from "
                            f"({changed}); pass the original shards, or extract into a new --out")
    return todo


def leave_cores_to_workers(device: torch.device, workers: int) -> None:
    """With the teacher on a GPU, the main process only batches views and hands latents on, while the
    decode workers keep the cores busy; a full OpenMP team then waits at every parallel region for
    threads the workers have descheduled (on an H200 host, 16 cores and 14 workers, concatenating one
    batch of views took ~380 ms, half the main thread's time). Give it the cores the workers leave."""
    if device.type != "cuda" or workers == 0:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - workers)))


def run_extract(cfg: ExtractConfig) -> ExtractStats:
    state = process_state()
    shards = expand_shards(cfg.shards)
    teacher = Teacher(cfg.teacher, device=state.device or "cpu", precision=cfg.precision,
                      allow_download=cfg.allow_download,
                      compile=cfg.compile_teacher)
    view_path = resolve_view_path(cfg.view_path, teacher.device, teacher.interpolation, cfg.views)
    if cfg.decoder == "device":
        require_device_view_path(view_path)
    meta = store_meta(cfg, teacher, view_path)
    store = open_store_for_run(cfg, meta, state)
    if state.is_main_process:
        store.record_plan([s.name for s in shards])
    mine = shards[state.process_index::state.num_processes]
    todo = units_to_do(store, mine)
    stats = ExtractStats(units_already_complete=len(mine) - len(todo))
    if state.is_main_process:
        logger.info(
            f"extract-targets: {len(shards)} shards, {len(todo)} to do on this rank ({stats.units_already_complete} "
            f"already complete), {state.num_processes} rank(s), K={cfg.views_per_image}, teacher "
            f"{meta.teacher['name']} ({'RANDOM INIT' if cfg.teacher.is_random else meta.teacher['pretrained']}) "
            f"on {state.device} {teacher.precision}{' (compiled)' if teacher.compiled else ''}, "
            f"grid {teacher.grid_size[0]}x{teacher.grid_size[1]}, dim {teacher.dim}; "
            f"views cut {where_views_are_cut(view_path, teacher.device)}")
    t0 = time.perf_counter()
    if todo:
        try:
            Extraction(cfg, teacher, store, view_path, stats, cfg.progress and state.is_main_process).run(todo)
        except OSError as e:
            raise UserError(f"target store {store.path}: {e.strerror or e} ({e.filename or 'writing a unit'}); the "
                            "complete units are kept: fix the file system (free space, permissions) and rerun the "
                            "same command") from None
    stats.seconds = time.perf_counter() - t0
    return stats


class Extraction:
    """The main process's side of one rank's extraction: it routes each loader message, cuts device-path
    views, feeds the teacher, assembles each unit's rows and hands whole blocks and markers to the
    writer thread."""

    def __init__(self, cfg: ExtractConfig, teacher: Teacher, store: TargetStore, view_path: str,
                 stats: ExtractStats, show_progress: bool):
        self.cfg, self.teacher, self.store, self.view_path, self.stats = cfg, teacher, store, view_path, stats
        self.meta = store.meta
        self.device_views = DeviceViews(teacher.image_size, teacher.interpolation, teacher.device) \
            if view_path == "device" else None
        self.packer = Packer(teacher.device)
        self.holder = Holder.me()
        self.heartbeat = Heartbeat(period=min(60.0, cfg.claim_timeout / 6))
        self.queue = TeacherQueue(teacher, cfg.views_per_image, cfg.batch_size, self.meta.latent_format)
        self.units: dict[str, UnitAssembler] = {}
        self.uncut: list[ImageViews] = []  # device path: images whose views are not cut yet
        self.writes: list[Future] = []
        self.uploads: list[Future] = []  # object stores: units being uploaded (appended by the writer thread)
        self.show_progress = show_progress
        self.handlers = {NotMine: self.on_not_mine, UnitStart: self.on_unit_start, Skip: self.on_skip,
                         ShardError: self.on_shard_error, ImageViews: self.on_views}

    def run(self, todo: list[Shard]) -> None:
        recipe = ViewRecipe(self.cfg.views, self.cfg.seed, self.cfg.views_per_image, self.teacher.image_size,
                            self.teacher.interpolation, device_views=self.device_views is not None,
                            device_decode=self.meta.decoder != "pillow")
        stream = UnitViewStream(todo, recipe, store=self.store.path, holder=self.holder,
                                claim_timeout=self.cfg.claim_timeout)
        workers = min(self.cfg.workers, len(todo))
        leave_cores_to_workers(self.teacher.device, workers)
        # Views and images go to the device in whole batches (the device path packs a batch's images into one
        # pinned buffer): nothing is pinned per item.
        context = worker_context(self.store.path, *(s.url for s in todo)) if workers else None
        loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=init_worker,
                            prefetch_factor=8 if workers else None, persistent_workers=False,
                            multiprocessing_context=context)
        self.bar = Progress(len(todo), unit="unit", enabled=self.show_progress, name="extract-targets")
        self.t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="uploader") as self.uploader, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer") as self.pool:
                for item in loader:
                    self.handlers[type(item)](item)
                self.feed(final=True)
                for f in self.writes:
                    f.result()
            for f in self.uploads:
                f.result()
        except BaseException:
            self.release_claims()
            raise
        finally:
            self.heartbeat.stop()
            self.bar.close()
        assert not self.units, f"units left unfinished: {sorted(self.units)}"

    def release_claims(self) -> None:
        """A run that fails lets go of the units it holds at once (where the file system still allows it), so
        that its rerun, or another job, takes them without waiting for the claims to go stale."""
        with contextlib.suppress(OSError, UserError):  # an object store that cannot be reached: they go stale
            for claim in claims_within(self.store.path):
                release(claim, self.holder)

    # --- the loader's messages ---------------------------------------------------------------------

    def on_not_mine(self, item: NotMine) -> None:
        if item.holder is None:
            self.stats.units_already_complete += 1
        else:
            self.stats.units_elsewhere.append(f"{item.shard.name}: being written by {item.holder.describe()}")
        self.bar.update(1)

    def on_unit_start(self, item: UnitStart) -> None:
        name = item.shard.name
        self.heartbeat.add(self.store.claim_path(name))
        writer = self.store.begin_unit(name, item.shard.url, item.keys, self.view_path, item.identity,
                                       item.image_crc)
        self.units[name] = UnitAssembler(writer, item.shard.url, self.meta)
        if not item.keys:
            self.submit(name, [])

    def on_skip(self, item: Skip) -> None:
        self.units[item.unit].writer.skip(item.row, item.key, item.reason)
        self.stats.skipped[item.reason] += 1
        self.submit(item.unit, self.units[item.unit].put(item.row, None))

    def on_shard_error(self, item: ShardError) -> None:
        self.stats.units_failed.append(item.message)
        self.bar.update(1)

    def on_views(self, item: ImageViews) -> None:
        if item.views is None:
            self.uncut.append(item)
        else:
            self.queue.put(item)
        self.feed()

    # --- teacher and writer --------------------------------------------------------------------------

    def feed(self, final: bool = False) -> None:
        """Cut the waiting device-path views once they fill a batch, run the teacher on whole batches,
        and hand on the images whose latents are back."""
        waiting = len(self.uncut) * self.cfg.views_per_image + self.queue.queued
        if self.uncut and (final or waiting >= self.cfg.batch_size):
            unreadable = decode_jpegs(self.uncut, self.teacher.device)
            if unreadable:
                gone = {id(item) for item, _ in unreadable}
                self.uncut = [item for item in self.uncut if id(item) not in gone]
                for item, reason in unreadable:
                    self.on_skip(Skip(item.unit, item.row, self.units[item.unit].writer.keys[item.row], reason))
            assert self.device_views is not None  # only the device view path leaves views uncut
            cut_views(self.uncut, self.device_views, self.packer)
            for item in self.uncut:
                self.queue.put(item)
            self.uncut.clear()
        self.queue.launch(final)
        done = self.queue.collect(keep_in_flight=0 if final else 1)
        for item, out in done:
            asm = self.units[item.unit]
            asm.writer.set_view_params(item.row, *item.records(), item.image_hw)
            if item.host_reason:  # set only where a device decoder left the image to Pillow
                asm.writer.decoded_on_host(item.row, item.host_reason)
            self.stats.images += 1
            self.stats.views += len(out["latents"])
            if "cos" in out:
                asm.quant.add(torch.from_numpy(out["cos"]), torch.from_numpy(out["err"]), asm.writer.keys[item.row],
                              item.row)
            self.submit(item.unit, asm.put(item.row, out["latents"], out.get("scales")))
        if done:
            rate = self.stats.views / (time.perf_counter() - self.t0)
            self.bar.update(0, note=f"{rate:.0f} views/s, {self.stats.images} images")

    def submit(self, unit: str, ready: list[tuple[int, np.ndarray, np.ndarray | None]]) -> None:
        """Queue the unit's ready blocks for the writer thread, and its marker once every row is in."""
        asm = self.units[unit]
        for start, block, scales in ready:
            self.writes.append(self.pool.submit(asm.writer.write_rows, start, block, scales))
            self.stats.bytes_written += block.nbytes + (0 if scales is None else scales.nbytes)
        if asm.done:
            del self.units[unit]
            self.bar.update(1)
            self.finish_unit(unit, asm)
        while self.writes and (self.writes[0].done() or len(self.writes) > 16):  # a writer error surfaces at once;
            self.writes.pop(0).result()                                          # queued blocks stay bounded
        while self.uploads and (self.uploads[0].done() or len(self.uploads) > 2):  # so do upload errors; at most
            self.uploads.pop(0).result()                                           # two units wait for theirs

    def finish_unit(self, unit: str, asm: UnitAssembler) -> None:
        int8 = self.meta.latent_format == "int8"
        failure = asm.quant.failure(unit, self.cfg.min_cosine, "the teacher's output",
                                    "rerun with --latent-format fp16 or a lower --min-cosine") if int8 else None
        if failure:
            self.stats.units_failed.append(failure)
            return
        self.writes.append(self.pool.submit(self._write_marker, unit, asm, asm.quant.record() if int8 else None))
        self.stats.units_done += 1
        self.stats.quant.merge(asm.quant)

    def _write_marker(self, unit: str, asm: UnitAssembler, quantization: dict | None) -> None:
        """Writer thread: the unit's metadata and marker (naming this writer), then its claim goes."""
        h = self.holder
        asm.writer.finish(asm.source, quantization, writer={"host": h.host, "pid": h.pid, "job": h.job})
        claim = self.store.claim_path(unit)
        if not self.heartbeat.holds(claim):  # taken over meanwhile (we looked dead): its taker writes it
            self.heartbeat.discard(claim)
            logger.warning(f"unit {unit}: another process took its claim over while this one wrote it; that "
                           "process writes it (the same values)")
            return
        if self.store.remote:  # uploaded beside the next units' writes, the marker last; the claim beats until then
            self.uploads.append(self.uploader.submit(self._publish, unit, claim))
        else:
            self._publish(unit, claim)

    def _publish(self, unit: str, claim) -> None:
        self.store.publish_unit(unit)
        self.heartbeat.discard(claim)
        release(claim, self.holder)
