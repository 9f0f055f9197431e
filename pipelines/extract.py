"""Stage 1: run the frozen teacher once over K views of every image and fill the target store.

Data flow on each rank (whole shards = units, `shards[rank::world]`):

    data-loader workers: read a whole shard -> decode each image once -> draw its K views and
        measure their contrast means -> Pillow view path: cut the views (targets.views);
        device view path: hand on the decoded image -> yield per image (or a skip record)
    main process: device view path: cut the views of a batch on the teacher's device
        (targets.device_views, bit-identical) -> teacher forward of batch i on the device while the
        host prepares batch i + 1 -> float16 latents
    writer thread: whole zarr shards of each unit as their rows complete, then the unit's marker

Complete units are skipped on a rerun; an incomplete one is removed and redone. A worker claims a
unit (targets.claims) before it reads it, so several jobs can run the same command on one store and
share the units, each written once: a unit another live process holds is skipped and reported.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import cae2
from cae2.errors import UserError
from pipelines.shards import Shard, expand_shards, image_bytes, iter_shard
from targets.cache import StoreMeta, TargetStore, UnitWriter, require_local_out
from targets.claims import STALE_AFTER, Heartbeat, Holder, release, try_claim
from targets.device_views import DeviceViews, check_supported, crop_box
from targets.quantize import LATENT_FORMATS, QuantStats, quantize, token_errors
from targets.teacher import Teacher, TeacherSpec
from targets.views import (
    DecodeError,
    ViewParams,
    ViewSettings,
    apply_view,
    decode_image,
    measure_view,
    sample_view,
)

VIEW_PATHS = ("auto", "pillow", "device")


@dataclass(kw_only=True)
class ExtractConfig:
    """Every option of `cae2 extract-targets` (the command line is generated from these fields)."""

    shards: str
    """Shards: a brace pattern, a directory, a glob, or a file listing URLs."""
    out: str
    """Target store (a Zarr v3 directory on a local or mounted file system); rerun to resume."""
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    views: ViewSettings = field(default_factory=ViewSettings)
    views_per_image: int = 5
    """K: cached views per image (storage grows linearly; see docs/cache.md)."""
    seed: int = 0
    """Seed of the view parameters (and of a random teacher's weights)."""
    batch_size: int = 256
    """Views per teacher forward."""
    workers: int = 4
    """Data-loader worker processes per rank (decode + views)."""
    precision: str = "auto"
    """auto (fp16 on a GPU, fp32 on CPU), fp32, bf16, fp16 (autocast), bf16-weights, fp16-weights (the
    weights cast)."""
    images_per_shard: int = 32
    """Images per zarr shard of the latents array (one write each)."""
    allow_download: bool = False
    """Allow downloading CLIP weights (else the local Hugging Face cache only)."""
    latent_format: str = "fp16"
    """fp16, or int8 with one float32 scale per token (half the bytes; targets.quantize)."""
    min_cosine: float = 0.999
    """int8: a unit whose dequantised latents reach a lower token cosine to the teacher's output fails."""
    claim_timeout: float = STALE_AFTER
    """Seconds without a heartbeat after which another host's claim on a unit counts as abandoned."""
    compile_teacher: bool = False
    """torch.compile the teacher's tower (one static batch shape; the last batch is padded to it)."""
    view_path: str = "auto"
    """pillow: views cut by the decode workers (the exact reference); device: the workers decode, the
    views are cut batched on the teacher's device (bit-identical); auto: device when that is a GPU."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.view_path not in VIEW_PATHS:
            raise UserError(f"--view-path must be one of {', '.join(VIEW_PATHS)}, not {self.view_path!r}")
        if self.latent_format not in LATENT_FORMATS:
            raise UserError(f"--latent-format must be one of {', '.join(LATENT_FORMATS)}, not {self.latent_format!r}")
        if not 0 <= self.min_cosine <= 1:
            raise UserError(f"--min-cosine must be in [0, 1], not {self.min_cosine}")
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
    views: torch.Tensor | None  # [K, 3, S, S] uint8 (the teacher normalises); None until cut (device path)
    view_int: np.ndarray  # [K, 10]
    view_float: np.ndarray  # [K, 4]
    image_hw: tuple[int, int]
    image: torch.Tensor | None = None  # device path: the decoded image, uint8 [H, W, 3]
    params: list[ViewParams] | None = None  # device path: the K views' parameters

    def pin_memory(self) -> ImageViews:
        """The DataLoader's pin-memory thread pins the image, so that its copy to the GPU waits for nothing."""
        if self.image is not None:
            self.image = self.image.pin_memory()
        return self


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


@dataclass
class NotMine:
    """A unit this run does not write: complete by now, or claimed by another live process."""

    shard: Shard
    holder: Holder | None  # None: complete


class UnitViewStream(IterableDataset):
    """Yields, per unit, a UnitStart and then one ImageViews or Skip per sample, in shard order.
    Worker w of W takes units w, w + W, ...; each image is decoded once for all its K views."""

    def __init__(self, shards: list[Shard], settings: ViewSettings, seed: int, k: int, size: int,
                 interpolation: str, device_views: bool = False, store: str | None = None,
                 holder: Holder | None = None, claim_timeout: float = STALE_AFTER):
        self.shards, self.settings, self.seed, self.k = shards, settings, seed, k
        self.size, self.interpolation, self.device_views = size, interpolation, device_views
        self.store, self.holder, self.claim_timeout = store, holder, claim_timeout

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        store = TargetStore.open(self.store) if self.store else None
        for shard in self.shards[wid::nw]:
            if store is not None:  # claim the unit first, then make sure nobody finished it meanwhile
                got, other = try_claim(claim_path(self.store, shard.name), self.holder, self.claim_timeout)
                if not got:
                    yield NotMine(shard, other)
                    continue
                if store.marker(shard.name) is not None:
                    release(claim_path(self.store, shard.name), self.holder)
                    yield NotMine(shard, None)
                    continue
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
        records = [p.to_record() for p in params]
        view_int, view_float = np.stack([r[0] for r in records]), np.stack([r[1] for r in records])
        if self.device_views:
            return ImageViews(unit, row, None, view_int, view_float, hw, torch.from_numpy(np.array(image)), params)
        views = torch.stack([apply_view(image, p, self.size, self.interpolation) for p in params])
        return ImageViews(unit, row, views, view_int, view_float, hw)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def claim_path(store: str, unit: str) -> Path:
    """The claim file of a unit: STORE/.claims/<unit>.claim (outside the zarr hierarchy)."""
    return Path(store) / ".claims" / f"{unit}.claim"


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
        rows = min(n, self.rows_per_shard)
        self.shapes = {"latents": (rows, meta.views_per_image, meta.num_tokens, meta.latent_dim)}
        self.dtypes = {"latents": np.int8 if meta.latent_format == "int8" else np.float16}
        if meta.latent_format == "int8":
            self.shapes["scales"], self.dtypes["scales"] = (rows, meta.views_per_image, meta.num_tokens), np.float32
        self.blocks: dict[int, dict[str, np.ndarray]] = {}  # zarr shard -> its arrays, until handed out
        self.quant = QuantStats()
        self.next_row = 0

    def put(self, row: int, latents: np.ndarray | None, scales: np.ndarray | None = None) -> list[tuple]:
        """Record a row (None = skipped); returns the blocks now ready: [(start_row, latents, scales or None)]."""
        shard, local = divmod(row, self.rows_per_shard)
        block = self.blocks.get(shard)
        if block is None:
            block = self.blocks[shard] = {name: np.zeros(shape, self.dtypes[name])
                                          for name, shape in self.shapes.items()}
        if latents is not None:
            block["latents"][local] = latents
            if scales is not None:
                block["scales"][local] = scales
        self.resolved[row] = True
        ready = []
        n = len(self.resolved)
        while self.next_row < n and self.resolved[self.next_row]:
            self.next_row += 1
            if self.next_row % self.rows_per_shard == 0 or self.next_row == n:
                shard = (self.next_row - 1) // self.rows_per_shard
                done = self.blocks.pop(shard)  # the writer owns it now
                start = shard * self.rows_per_shard
                rows = self.next_row - start
                ready.append((start, done["latents"][:rows], done["scales"][:rows] if "scales" in done else None))
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
    quant: QuantStats = field(default_factory=QuantStats)
    units_elsewhere: list = field(default_factory=list)
    """Units another live process was writing (skipped)."""


def _meta(cfg: ExtractConfig, teacher: Teacher, view_path: str) -> StoreMeta:
    return StoreMeta(teacher=teacher.identity().to_json(), views=cfg.views.to_dict(), seed=cfg.seed,
                     views_per_image=cfg.views_per_image, input_size=teacher.image_size, grid=teacher.grid_size,
                     num_tokens=teacher.num_tokens, latent_dim=teacher.dim, mean=teacher.mean, std=teacher.std,
                     interpolation=teacher.interpolation, images_per_shard=cfg.images_per_shard,
                     latent_format=cfg.latent_format, view_path=view_path, cae2_version=cae2.__version__)


def where_views_are_cut(view_path: str, device: torch.device) -> str:
    return f"on {device} (device view path)" if view_path == "device" else "by Pillow on the host (Pillow view path)"


def resolve_view_path(choice: str, device: torch.device, interpolation: str, settings: ViewSettings) -> str:
    """'auto' -> 'device' on a GPU when the device path reproduces these settings, else 'pillow'."""
    if choice == "pillow" or (choice == "auto" and device.type != "cuda"):
        return "pillow"
    try:
        check_supported(interpolation, settings.hue)
    except ValueError as e:
        if choice == "device":
            raise UserError(f"--view-path device: {e}") from None
        return "pillow"
    return "device"


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
    teacher = Teacher(cfg.teacher, device=state.device, precision=cfg.precision, allow_download=cfg.allow_download,
                      compile=cfg.compile_teacher)
    view_path = resolve_view_path(cfg.view_path, teacher.device, teacher.interpolation, cfg.views)
    meta = _meta(cfg, teacher, view_path)
    store = open_store_for_run(cfg, meta, state)
    mine = shards[state.process_index::state.num_processes]
    todo = [s for s in mine if store.marker(s.name) is None]
    stats = ExtractStats(units_already_complete=len(mine) - len(todo))
    if state.is_main_process:
        log(f"extract-targets: {len(shards)} shards, {len(todo)} to do on this rank ({stats.units_already_complete} "
            f"already complete), {state.num_processes} rank(s), K={cfg.views_per_image}, teacher "
            f"{meta.teacher['name']} ({'RANDOM INIT' if cfg.teacher.is_random else meta.teacher['pretrained']}) "
            f"on {state.device} {teacher.precision}{' (compiled)' if teacher.compiled else ''}, "
            f"grid {teacher.grid_size[0]}x{teacher.grid_size[1]}, dim {teacher.dim}; "
            f"views cut {where_views_are_cut(view_path, teacher.device)}")
    t0 = time.perf_counter()
    if todo:
        try:
            _extract_units(cfg, todo, teacher, store, meta, stats, show_progress=cfg.progress and state.is_main_process,
                           view_path=view_path)
        except OSError as e:
            raise UserError(f"target store {store.path}: {e.strerror or e} ({e.filename or 'writing a unit'}); the "
                            "complete units are kept: fix the file system (free space, permissions) and rerun the "
                            "same command") from None
    stats.seconds = time.perf_counter() - t0
    return stats


class TeacherQueue:
    """Views go in, in image order; the teacher runs on whole batches, and each image's K latents come
    out once all of them are back. On a GPU, batch i's forward and its copy to the host run while the
    host prepares batch i + 1 (one batch in flight). int8 latents are quantised on the teacher's device,
    and their per-token error against its output travels with them."""

    def __init__(self, teacher: Teacher, k: int, batch_size: int, latent_format: str):
        self.teacher, self.k, self.batch_size, self.int8 = teacher, k, batch_size, latent_format == "int8"
        self.views: deque[torch.Tensor] = deque()  # view tensors not yet sent, in order
        self.queued = 0  # views in self.views
        self.waiting: deque[ImageViews] = deque()  # images whose latents are not all back, in order
        self.carried: dict[str, np.ndarray] = {}  # outputs of the first waiting image's first views
        self.in_flight: deque[tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = deque()

    def put(self, item: ImageViews) -> None:
        self.views.append(item.views)
        self.queued += len(item.views)
        self.waiting.append(item)

    def launch(self, final: bool = False) -> None:
        """Send whole batches of the queued views to the teacher (all of them when final)."""
        while self.queued >= self.batch_size or (final and self.queued):
            n, parts = min(self.batch_size, self.queued), []
            while sum(len(p) for p in parts) < n:
                v = self.views.popleft()
                need = n - sum(len(p) for p in parts)
                if len(v) > need:
                    self.views.appendleft(v[need:])
                    v = v[:need]
                parts.append(v)
            self.queued -= n
            out = self.teacher(torch.cat(parts) if len(parts) > 1 else parts[0])
            if self.int8:
                q, scales = quantize(out)
                cos, err = token_errors(out, q, scales)
                outputs = {"latents": q, "scales": scales, "cos": cos, "err": err}
            else:
                outputs = {"latents": out.to(torch.float16)}
            if out.device.type == "cuda":
                host = {}
                for name, t in outputs.items():
                    host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    host[name].copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self.in_flight.append((host, done))
            else:
                self.in_flight.append((outputs, None))

    def collect(self, keep_in_flight: int = 1) -> list[tuple[ImageViews, dict[str, np.ndarray]]]:
        """(image, {latents [K, 1 + T, D], and for int8 scales, cos, err [K, 1 + T]}) of every image
        completed by the batches that came back, leaving up to `keep_in_flight` batches running."""
        done = []
        while len(self.in_flight) > keep_in_flight:
            outputs, event = self.in_flight.popleft()
            if event is not None:
                event.synchronize()
            arrays = {name: t.numpy() for name, t in outputs.items()}
            if self.carried:
                arrays = {name: np.concatenate([self.carried[name], a]) for name, a in arrays.items()}
            complete = len(arrays["latents"]) // self.k
            for i in range(complete):
                rows = slice(i * self.k, (i + 1) * self.k)
                done.append((self.waiting.popleft(), {name: a[rows] for name, a in arrays.items()}))
            self.carried = {name: a[complete * self.k:].copy() for name, a in arrays.items()}
        return done


def _cut_views(items: list[ImageViews], views: DeviceViews) -> None:
    """Device view path: cut the views of these images on the teacher's device, in one batch."""
    crops, params = [], []
    for item in items:
        image = item.image.to(views.device, non_blocking=True)
        crops += [crop_box(image, p) for p in item.params]
        params += item.params
        item.image = None
    out = views.make(crops, params)
    start = 0
    for item in items:
        item.views = out[start:start + len(item.params)]
        start += len(item.params)


def _extract_units(cfg: ExtractConfig, todo: list[Shard], teacher: Teacher, store: TargetStore, meta: StoreMeta,
                   stats: ExtractStats, show_progress: bool, view_path: str) -> None:
    from tqdm import tqdm

    device_views = DeviceViews(teacher.image_size, teacher.interpolation, teacher.device) \
        if view_path == "device" else None
    holder = Holder.me()
    heartbeat = Heartbeat(period=min(60.0, cfg.claim_timeout / 6))
    stream = UnitViewStream(todo, cfg.views, cfg.seed, cfg.views_per_image, teacher.image_size,
                            teacher.interpolation, device_views=device_views is not None, store=store.path,
                            holder=holder, claim_timeout=cfg.claim_timeout)
    workers = min(cfg.workers, len(todo))
    _leave_cores_to_workers(teacher.device, workers)
    # Pinned images for the device path on a GPU; the Pillow path's views are copied in whole batches.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_worker_init,
                        prefetch_factor=8 if workers else None, persistent_workers=False,
                        pin_memory=device_views is not None and teacher.device.type == "cuda")
    units: dict[str, UnitAssembler] = {}
    queue = TeacherQueue(teacher, cfg.views_per_image, cfg.batch_size, meta.latent_format)
    uncut: list[ImageViews] = []  # device path: images whose views are not cut yet
    writes: list[Future] = []
    bar = tqdm(total=len(todo), unit="shard", disable=not show_progress, dynamic_ncols=True)
    t0 = time.perf_counter()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zarr-writer") as pool:

        def submit(unit: str, ready: list[tuple]) -> None:
            asm = units[unit]
            for start, block, scales in ready:
                writes.append(pool.submit(asm.writer.write_rows, start, block, scales))
                stats.bytes_written += block.nbytes + (0 if scales is None else scales.nbytes)
            if asm.done:
                del units[unit]
                bar.update(1)
                if meta.latent_format == "int8" and asm.quant.tokens and asm.quant.min_cosine < cfg.min_cosine:
                    w = asm.quant.worst
                    stats.units_failed.append(
                        f"unit {unit}: int8 latents of key {w['key']} (row {w['row']}, view {w['view']}, token "
                        f"{w['token']}) reach a token cosine of {asm.quant.min_cosine:.6f} to the teacher's output, "
                        f"below --min-cosine {cfg.min_cosine}; the unit is left incomplete: rerun with "
                        "--latent-format fp16 or a lower --min-cosine")
                    return
                writes.append(pool.submit(_finish_unit, asm, claim_path(store.path, unit), holder, heartbeat,
                                          asm.quant.record() if meta.latent_format == "int8" else None))
                stats.units_done += 1
                stats.quant.merge(asm.quant)
            while len(writes) > 16:  # bound memory held by queued blocks; surface writer errors
                writes.pop(0).result()

        def hand_out(done: list[tuple[ImageViews, dict[str, np.ndarray]]]) -> None:
            for item, out in done:
                asm = units[item.unit]
                w = asm.writer
                w.view_int[item.row], w.view_float[item.row] = item.view_int, item.view_float
                w.image_hw[item.row], w.valid[item.row] = item.image_hw, True
                stats.images += 1
                stats.views += len(out["latents"])
                if "cos" in out:
                    asm.quant.add(torch.from_numpy(out["cos"]), torch.from_numpy(out["err"]), w.keys[item.row],
                                  item.row)
                submit(item.unit, asm.put(item.row, out["latents"], out.get("scales")))
            if done:
                bar.set_postfix_str(f"{stats.views / (time.perf_counter() - t0):.0f} views/s, {stats.images} images")

        def feed(final: bool = False) -> None:
            if uncut and (final or sum(len(i.params) for i in uncut) + queue.queued >= cfg.batch_size):
                _cut_views(uncut, device_views)
                for item in uncut:
                    queue.put(item)
                uncut.clear()
            queue.launch(final)
            hand_out(queue.collect(keep_in_flight=0 if final else 1))

        for item in loader:
            if isinstance(item, NotMine):
                if item.holder is None:
                    stats.units_already_complete += 1
                else:
                    stats.units_elsewhere.append(f"{item.shard.name}: being written by {item.holder.describe()}")
                bar.update(1)
            elif isinstance(item, UnitStart):
                heartbeat.add(claim_path(store.path, item.shard.name))
                writer = store.begin_unit(item.shard.name, item.shard.url, item.keys)
                writer.view_path = view_path
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
                if item.views is None:
                    uncut.append(item)
                else:
                    queue.put(item)
                feed()
        feed(final=True)
        for f in writes:
            f.result()
    heartbeat.stop()
    bar.close()
    assert not units, f"units left unfinished: {sorted(units)}"


def _finish_unit(asm: UnitAssembler, claim, holder: Holder, heartbeat: Heartbeat, quantization: dict | None) -> None:
    """Writer thread: the unit's metadata and marker (written by this holder), then its claim goes."""
    asm.writer.writer = {"host": holder.host, "pid": holder.pid, "job": holder.job}
    asm.writer.finish(asm.source, quantization)
    heartbeat.discard(claim)
    release(claim, holder)


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
    if stats.units_elsewhere:
        lines.append(f"units being written by other processes (skipped; rerun when they are done to check): "
                     f"{len(stats.units_elsewhere)}")
        lines += [f"  {m}" for m in stats.units_elsewhere[:20]]
    if stats.quant.tokens:
        lines.append(stats.quant.summary())
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
        total.quant.merge(s.quant)
        total.units_elsewhere += s.units_elsewhere
    return total
