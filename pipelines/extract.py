"""Stage 1: run the frozen teacher once over K views of every image and fill the target store.

Data flow on each rank (whole shards = units, `shards[rank::world]`):

    data-loader workers: read a whole shard -> decode each image once -> cut its K views
        (targets.views) -> yield per-image view tensors (or a skip record)
    main process: batch views across images -> teacher forward -> float16 latents
    writer thread: whole zarr shards of each unit as their rows complete, then the unit's marker

Complete units are skipped on a rerun; an incomplete one is removed and redone.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import cae2
from cae2.errors import UserError
from pipelines.shards import Shard, expand_shards, image_bytes, iter_shard
from targets.cache import StoreMeta, TargetStore, UnitWriter, require_local_out
from targets.teacher import Teacher, TeacherSpec
from targets.views import DecodeError, ViewSettings, apply_view, decode_image, measure_view, sample_view


@dataclass(kw_only=True)
class ExtractConfig:
    shards: str
    out: str
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    views: ViewSettings = field(default_factory=ViewSettings)
    views_per_image: int = 5
    """K: cached views per image (storage grows linearly; see docs/cache.md)."""
    seed: int = 0
    batch_size: int = 256
    """Views per teacher forward."""
    workers: int = 4
    """Data-loader worker processes per rank (decode + views)."""
    precision: str = "auto"
    images_per_shard: int = 32
    """Images per zarr shard of the latents array (one write each)."""
    allow_download: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.views_per_image < 1:
            raise UserError("--views must be >= 1")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        if self.workers < 0:
            raise UserError("--workers must be >= 0")
        require_local_out(self.out)  # before the teacher is loaded


# --- data-loader side ----------------------------------------------------------------------------

@dataclass
class UnitStart:
    shard: Shard
    keys: list[str]


@dataclass
class ImageViews:
    unit: str
    row: int
    views: torch.Tensor  # [K, 3, S, S] uint8 (the teacher normalises)
    view_int: np.ndarray  # [K, 9]
    view_float: np.ndarray  # [K, 4]
    image_hw: tuple[int, int]


@dataclass
class Skip:
    unit: str
    row: int
    key: str
    reason: str


@dataclass
class ShardError:
    shard: Shard
    message: str


class UnitViewStream(IterableDataset):
    """Yields, per unit, a UnitStart and then one ImageViews or Skip per sample, in shard order.
    Worker w of W takes units w, w + W, ...; each image is decoded once for all its K views."""

    def __init__(self, shards: list[Shard], settings: ViewSettings, seed: int, k: int, size: int,
                 interpolation: str):
        self.shards, self.settings, self.seed, self.k = shards, settings, seed, k
        self.size, self.interpolation = size, interpolation

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for shard in self.shards[wid::nw]:
            try:
                samples = list(iter_shard(shard.url))  # whole shard: the row count is known up front
            except UserError as e:
                yield ShardError(shard, str(e))
                continue
            yield UnitStart(shard, [s["__key__"] for s in samples])
            for row, sample in enumerate(samples):
                yield self._views(shard.name, row, sample)

    def _views(self, unit: str, row: int, sample: dict) -> ImageViews | Skip:
        key = sample["__key__"]
        data = image_bytes(sample)
        if data is None:
            fields = ", ".join(k for k in sample if not k.startswith("__")) or "none"
            return Skip(unit, row, key, f"no image field (has: {fields})")
        try:
            image = decode_image(data)
        except DecodeError as e:
            return Skip(unit, row, key, str(e))
        hw = (image.height, image.width)
        params = [measure_view(sample_view(self.settings, self.seed, key, k, hw), image) for k in range(self.k)]
        views = torch.stack([apply_view(image, p, self.size, self.interpolation) for p in params])
        records = [p.to_record() for p in params]
        return ImageViews(unit, row, views, np.stack([r[0] for r in records]), np.stack([r[1] for r in records]), hw)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _leave_cores_to_workers(device: torch.device, workers: int) -> None:
    """With the teacher on a GPU, the main process only batches views and hands latents on, while the
    decode workers keep the cores busy; a full OpenMP team then waits at every parallel region for
    threads the workers have descheduled (on an H200 host, 16 cores and 14 workers, concatenating one
    batch of views took ~380 ms, half the main thread's time). Give it the cores the workers leave."""
    if device.type != "cuda" or workers == 0:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - workers)))


# --- main-process side ---------------------------------------------------------------------------

class UnitAssembler:
    """Collects one unit's rows (any order), hands whole zarr shards to the writer in row order."""

    def __init__(self, writer: UnitWriter, source: str, meta: StoreMeta):
        self.writer, self.source = writer, source
        n = len(writer.keys)
        self.resolved = np.zeros(n, bool)
        self.rows_per_shard = meta.images_per_shard
        self.block_shape = (min(n, self.rows_per_shard), meta.views_per_image, meta.num_tokens, meta.latent_dim)
        self.block = np.zeros(self.block_shape, np.float16)
        self.next_row = 0

    def put(self, row: int, latents: np.ndarray | None) -> list[tuple[int, np.ndarray]]:
        """Record a row (None = skipped); returns the blocks now ready: [(start_row, latents)]."""
        if latents is not None:
            self.block[row % self.rows_per_shard] = latents
        self.resolved[row] = True
        ready = []
        n = len(self.resolved)
        while self.next_row < n and self.resolved[self.next_row]:
            self.next_row += 1
            if self.next_row % self.rows_per_shard == 0 or self.next_row == n:
                start = (self.next_row - 1) // self.rows_per_shard * self.rows_per_shard
                ready.append((start, self.block[: self.next_row - start]))
                self.block = np.zeros(self.block_shape, np.float16)  # the writer owns the full one
        return ready

    @property
    def done(self) -> bool:
        return self.next_row == len(self.resolved)


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


def _meta(cfg: ExtractConfig, teacher: Teacher) -> StoreMeta:
    return StoreMeta(teacher=teacher.identity(), views=cfg.views.to_dict(), seed=cfg.seed,
                     views_per_image=cfg.views_per_image, input_size=teacher.image_size, grid=teacher.grid_size,
                     num_tokens=teacher.num_tokens, latent_dim=teacher.dim, mean=teacher.mean, std=teacher.std,
                     interpolation=teacher.interpolation, images_per_shard=cfg.images_per_shard,
                     cae2_version=cae2.__version__)


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


def run_extract(cfg: ExtractConfig, log=print) -> ExtractStats:
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo ranks when launched on CPUs
    shards = expand_shards(cfg.shards)
    teacher = Teacher(cfg.teacher, device=state.device, precision=cfg.precision, allow_download=cfg.allow_download)
    meta = _meta(cfg, teacher)
    store = open_store_for_run(cfg, meta, state)
    mine = shards[state.process_index::state.num_processes]
    todo = [s for s in mine if store.marker(s.name) is None]
    stats = ExtractStats(units_already_complete=len(mine) - len(todo))
    if state.is_main_process:
        log(f"extract-targets: {len(shards)} shards, {len(todo)} to do on this rank ({stats.units_already_complete} "
            f"already complete), {state.num_processes} rank(s), K={cfg.views_per_image}, teacher "
            f"{meta.teacher['name']} ({'RANDOM INIT' if cfg.teacher.is_random else meta.teacher['pretrained']}) "
            f"on {state.device} {teacher.precision}, grid {teacher.grid_size[0]}x{teacher.grid_size[1]}, "
            f"dim {teacher.dim}")
    t0 = time.perf_counter()
    if todo:
        _extract_units(cfg, todo, teacher, store, meta, stats, show_progress=cfg.progress and state.is_main_process)
    stats.seconds = time.perf_counter() - t0
    return stats


def _extract_units(cfg: ExtractConfig, todo: list[Shard], teacher: Teacher, store: TargetStore, meta: StoreMeta,
                   stats: ExtractStats, show_progress: bool) -> None:
    from tqdm import tqdm

    stream = UnitViewStream(todo, cfg.views, cfg.seed, cfg.views_per_image, teacher.image_size,
                            teacher.interpolation)
    workers = min(cfg.workers, len(todo))
    _leave_cores_to_workers(teacher.device, workers)
    # No pin_memory: it pins tensors, not ImageViews records, so its thread would only add a queue hop.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_worker_init,
                        prefetch_factor=8 if workers else None, persistent_workers=False)
    units: dict[str, UnitAssembler] = {}
    pending: list[ImageViews] = []
    writes: list[Future] = []
    bar = tqdm(total=len(todo), unit="shard", disable=not show_progress, dynamic_ncols=True)
    t0 = time.perf_counter()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer") as pool:

        def submit(unit: str, ready: list[tuple[int, np.ndarray]]) -> None:
            asm = units[unit]
            for start, block in ready:
                writes.append(pool.submit(asm.writer.write_rows, start, block))
                stats.bytes_written += block.nbytes
            if asm.done:
                writes.append(pool.submit(asm.writer.finish, asm.source))
                del units[unit]
                stats.units_done += 1
                bar.update(1)
            while len(writes) > 16:  # bound memory held by queued blocks; surface writer errors
                writes.pop(0).result()

        carried = np.zeros((0, meta.num_tokens, meta.latent_dim), np.float16)  # latents of pending[0]'s first views

        def flush(final: bool = False) -> None:
            """Run the teacher on whole batches of the pending views (all of them when final) and hand
            every image whose K views are done to its unit; a partly done image waits for the next batch."""
            nonlocal carried
            k = cfg.views_per_image
            todo = len(pending) * k - len(carried)
            n = todo if final else todo // cfg.batch_size * cfg.batch_size
            if n == 0:
                return
            views = torch.cat([item.views for item in pending])[len(carried):len(carried) + n]  # [n, 3, S, S]
            out = torch.cat([teacher(chunk) for chunk in views.split(cfg.batch_size)])
            out = out.to(torch.float16).cpu().numpy()
            latents = np.concatenate([carried, out]) if len(carried) else out
            complete = len(latents) // k
            for i, item in enumerate(pending[:complete]):
                asm = units[item.unit]
                w = asm.writer
                w.view_int[item.row], w.view_float[item.row] = item.view_int, item.view_float
                w.image_hw[item.row], w.valid[item.row] = item.image_hw, True
                stats.images += 1
                stats.views += k
                submit(item.unit, asm.put(item.row, latents[i * k:(i + 1) * k]))
            del pending[:complete]
            carried = latents[complete * k:].copy()
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"{stats.views / elapsed:.0f} views/s, {stats.images} images")

        for item in loader:
            if isinstance(item, UnitStart):
                writer = store.begin_unit(item.shard.name, item.shard.url, item.keys)
                units[item.shard.name] = UnitAssembler(writer, item.shard.url, meta)
                if not item.keys:
                    submit(item.shard.name, [])
            elif isinstance(item, Skip):
                units[item.unit].writer.skipped.append({"key": item.key, "row": item.row, "reason": item.reason})
                stats.skipped[item.reason.split(":")[0]] += 1
                submit(item.unit, units[item.unit].put(item.row, None))
            elif isinstance(item, ShardError):
                stats.units_failed.append(item.message)
                bar.update(1)
            else:
                pending.append(item)
                if len(pending) * cfg.views_per_image - len(carried) >= cfg.batch_size:
                    flush()
        flush(final=True)
        for f in writes:
            f.result()
    bar.close()
    assert not units, f"units left unfinished: {sorted(units)}"


def format_summary(stats: ExtractStats, ranks: int) -> str:
    rate = stats.views / stats.seconds if stats.seconds else 0.0
    skipped = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.most_common()) or "none"
    lines = [
        f"units: {stats.units_done} written, {stats.units_already_complete} already complete, "
        f"{len(stats.units_failed)} failed",
        f"images: {stats.images}  views: {stats.views}  skipped: {sum(stats.skipped.values())} ({skipped})",
        f"written: {stats.bytes_written / 2**20:.1f} MiB  time: {stats.seconds:.1f}s  "
        f"throughput: {rate:.1f} views/s over {ranks} rank(s)",
    ]
    lines += [f"FAILED: {m}" for m in stats.units_failed]
    return "\n".join(lines)


def merge_stats(all_stats: list[ExtractStats]) -> ExtractStats:
    total = ExtractStats()
    for s in all_stats:
        total.units_done += s.units_done
        total.units_already_complete += s.units_already_complete
        total.units_failed += s.units_failed
        total.images += s.images
        total.views += s.views
        total.skipped.update(s.skipped)
        total.bytes_written += s.bytes_written
        total.seconds = max(total.seconds, s.seconds)
    return total
