"""Stage 2 data: stream the shards, join every sample to its cached targets, re-apply the view.

An epoch is planned up front from the store's per-shard sample lists, so that every rank runs
the same number of steps and the data position is a single number:

    1. shard order   = permutation of all shards by (seed, epoch)
    2. sequence      = the valid samples of those shards in shard order (skipped ones never enter)
    3. rank r        gets the contiguous slice [r * P, (r + 1) * P), P = (len // (ranks * B)) * B
                     -> equal steps everywhere, no sample twice, fewer than ranks * B left out
    4. worker w      of the rank gets a contiguous run of whole batches of that slice, streams the
                     shards it spans with WebDataset, and shuffles within a bounded buffer
    5. per sample    the view index and the mask are drawn from generators keyed by
                     (seed, epoch, key), so they do not depend on order, workers or ranks
    6. views         Pillow view path: the worker cuts each view; device view path: the worker
                     decodes, crops and pads the crops of a batch into groups of similar size, and
                     the training process cuts the views on its device (bit-identical)

The DataLoader returns worker batches round-robin, so micro-batch j of an epoch comes from worker
j % W; resuming after j batches makes each worker skip its share without decoding anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cae2.errors import UserError
from cae2.masking import create_mask_generator
from pipelines.runs import init_worker
from pipelines.shards import Shard, iter_shard, required_image_bytes, shard_changed
from targets.decoders import device_decodable
from targets.device_views import PackedImages, crop_record
from targets.storage import worker_context
from targets.store import DamagedUnit, TargetStore
from targets.store_meta import N_INT, StoreMeta
from targets.unit_reader import ChangedSample, CorruptTarget
from targets.views import ViewParams, decode_image, measure_view, render_view


@dataclass(frozen=True)
class ShardIndex:
    """The valid rows of one shard, as recorded by stage 1."""

    shard: Shard
    rows: np.ndarray  # int64 rows (positions in the tar) of valid samples
    num_samples: int  # all samples of the shard, skipped ones included


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    workers: int = 0
    shuffle_buffer: int = 1000
    student_size: int = 224
    student_interpolation: str = "bicubic"
    teacher_views: bool = False
    """Also return the teacher's view of each sample (for --teacher-online) instead of cached latents."""
    view_path: str = "pillow"
    """pillow: the workers cut the views; device: they return padded crops (`DeviceViews.make_batch`)."""
    device_decode: bool = False
    """Device view path: hand on the JPEG file of each image the training device decodes (the rows its
    store's device decoder decoded), and crops of the others."""
    corrupt_targets: str = "stop"
    """A view whose cached bytes fail their crc32c: stop (raise, naming it), skip (leave the sample out of
    its batch, with a warning), or off (no check)."""


# Salts of the generators keyed by (seed, epoch, ...): changing one changes every run's data order,
# view choice or masks (tests/test_golden.py pins what they give).
SHARD_ORDER_SALT = 0x5EED
SHUFFLE_SALT = 0xB0F
VIEW_INDEX_SALT = "view"
MASK_SALT = "mask"
LOADER_SALT = "loader"


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()[:8], "little")


def index_shards(store: TargetStore, shards: list[Shard]) -> list[ShardIndex]:
    """Check the store covers every shard completely, and list each shard's valid rows (from the markers:
    every row but the skipped ones; in an object store the markers are fetched side by side)."""
    store.prefetch_markers([s.name for s in shards])
    states = {s.name: store.unit_state(s.name) for s in shards}
    damaged = [(name, why) for name, (_, why) in states.items() if why]
    if damaged:
        raise DamagedUnit(store.path, *damaged[0]) if len(damaged) == 1 else UserError(
            f"--targets {store.path}: {len(damaged)} units are damaged (e.g. {damaged[0][0]}: {damaged[0][1]}); "
            f"rerun `cae2 {store.meta.written_by}` with the same options: it redoes them")
    markers = {name: marker for name, (marker, _) in states.items()}
    missing = [name for name, marker in markers.items() if marker is None]
    if missing:
        known = set(store.unit_names())
        absent = [m for m in missing if m not in known]
        what = (f"{len(absent)} shard(s) are not in the target store (e.g. {absent[0]})" if absent
                else f"{len(missing)} shard(s) are incomplete in the target store (e.g. {missing[0]})")
        converted = store.meta.written_by == "convert-targets"
        how = (f"rerun `cae2 convert-targets` into {store.path} to finish it" if converted
               else "run `cae2 extract-targets` with these --shards first")
        raise UserError(f"--targets {store.path}: {what}; {how}")
    out = []
    for s in shards:
        marker = markers[s.name]
        assert marker is not None  # missing units were refused above
        changed = shard_changed(marker.get("source_identity"), s.url, read=False)
        if changed:
            raise UserError(f"--shards: {s.url} is not the shard unit {s.name} of {store.path} was made from "
                            f"({changed}); pass the shards the store was extracted from")
        n = int(marker["num_samples"])
        valid = np.ones(n, bool)
        valid[[int(d["row"]) for d in marker["skipped"]]] = False
        out.append(ShardIndex(s, np.flatnonzero(valid), n))
    if not any(len(i.rows) for i in out):
        raise UserError("--shards: no valid samples in these shards")
    return out


@dataclass
class EpochPlan:
    """Which samples each rank and worker reads in one epoch."""

    batches_per_rank: int
    left_out: int
    worker_segments: list[list[tuple[Shard, np.ndarray]]] = field(default_factory=list)
    worker_batches: list[int] = field(default_factory=list)


def plan_epoch(index: list[ShardIndex], cfg: StreamConfig, epoch: int) -> EpochPlan:
    order = np.random.default_rng([cfg.seed, epoch, SHARD_ORDER_SALT]).permutation(len(index))
    shards = [index[i] for i in order]
    total = sum(len(s.rows) for s in shards)
    per_rank = total // (cfg.world * cfg.batch_size) * cfg.batch_size
    nb = per_rank // cfg.batch_size
    if nb == 0:
        raise UserError(f"{total} samples are fewer than ranks x batch = {cfg.world} x {cfg.batch_size}; "
                        "lower --batch-size or add data")
    workers = max(cfg.workers, 1)
    counts = [nb // workers + (w < nb % workers) for w in range(workers)]
    plan = EpochPlan(batches_per_rank=nb, left_out=total - per_rank * cfg.world, worker_batches=counts)
    # global positions of each shard's first valid sample
    starts = np.cumsum([0] + [len(s.rows) for s in shards])
    lo = cfg.rank * per_rank
    for c in counts:
        hi = lo + c * cfg.batch_size
        segments = []
        for i, s in enumerate(shards):
            a, b = max(lo, starts[i]), min(hi, starts[i + 1])
            if a < b:
                segments.append((s.shard, s.rows[a - starts[i]:b - starts[i]]))
        plan.worker_segments.append(segments)
        lo = hi
    return plan


def resume_position(physical: int, workers: int, skip_batches: int) -> tuple[int, int]:
    """-> (logical worker, batches it skips) of loader worker `physical` after `skip_batches` micro-batches.

    The loader polls its workers round-robin from worker 0, and micro-batch j belongs to logical worker
    j % workers: after a resume at batch s, loader worker i plays logical worker (i + s) % workers,
    which skips the batches it made before the resume."""
    wid = (physical + skip_batches) % workers
    return wid, max(0, (skip_batches - wid + workers - 1) // workers)


def view_index(seed: int, epoch: int, key: str, k: int) -> int:
    return _stable_int(VIEW_INDEX_SALT, seed, epoch, key) % k


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([_stable_int(MASK_SALT, seed, epoch, key)])


class TrainStream(IterableDataset):
    """Yields ready batches for one (epoch, rank): dict with images [B, 3, S, S] uint8 (normalised on
    the device; or view_groups, the device path's padded crops), mask [B, N] bool, targets [B, 1 + T, D]
    float16 (int8 stores: int8 and target_scales [B, 1 + T]; or teacher_images, uint8), keys."""

    def __init__(self, store_path: str, meta: StoreMeta, plan: EpochPlan, cfg: StreamConfig, model_cfg, epoch: int,
                 skip_batches: int = 0):
        self.store_path, self.meta, self.plan, self.cfg = store_path, meta, plan, cfg
        self.model_cfg, self.epoch, self.skip_batches = model_cfg, epoch, skip_batches
        # --teacher-online with the teacher's input size and resampling: its view is the student's
        same_views = (cfg.student_size, cfg.student_interpolation) == (meta.input_size, meta.interpolation)
        self.view_batch = functools.partial(VIEW_BATCHES[cfg.view_path], cfg, meta, same_views)

    def __iter__(self):
        info = get_worker_info()
        physical, nw = (info.id, info.num_workers) if info else (0, 1)
        assert nw == max(self.cfg.workers, 1), "plan and loader disagree on the worker count"
        wid, skip = resume_position(physical, nw, self.skip_batches)
        store = TargetStore.open(self.store_path)
        masker = create_mask_generator(self.model_cfg)
        buffer_rng = np.random.default_rng([self.cfg.seed, self.epoch, self.cfg.rank, wid, SHUFFLE_SALT])
        batch: list = []
        produced = 0
        for item in _shuffled(self._samples(store, wid), self.cfg.shuffle_buffer, buffer_rng):
            batch.append(item)
            if len(batch) == self.cfg.batch_size:
                if produced >= skip:
                    yield self._collate(batch, masker)
                produced += 1
                batch = []

    def _samples(self, store: TargetStore, wid: int):
        """(unit reader, row, sample) for this worker's rows, in shard order."""
        for shard, rows in self.plan.worker_segments[wid]:
            unit = store.unit(shard.name)
            wanted = iter(rows.tolist())
            nxt = next(wanted, None)
            for row, sample in enumerate(iter_shard(shard.url)):
                if row == nxt:
                    if sample["__key__"] != unit.keys[row]:
                        raise UserError(f"shard {shard.url} row {row} has key {sample['__key__']!r} but the target "
                                        f"store has {unit.keys[row]!r}: the store was built from other shards")
                    yield unit, row, sample
                    nxt = next(wanted, None)
                    if nxt is None:
                        break
            if nxt is not None:
                raise UserError(f"shard {shard.url} ended before row {nxt}: it differs from the one the target "
                                "store was built from")

    def _collate(self, batch, masker) -> dict:
        cfg = self.cfg
        views = self.view_batch()
        masks, keys, chosen, targets, warnings = [], [], [], [], []
        for unit, row, sample in batch:
            key = unit.keys[row]
            k = view_index(cfg.seed, self.epoch, key, self.meta.views_per_image)
            data = required_image_bytes(sample)
            changed = unit.image_changed(row, data) if cfg.corrupt_targets != "off" else None
            if changed and cfg.corrupt_targets == "stop":
                raise ChangedSample(f"{changed}; restore the shard, or make a store of these shards (extract-targets "
                                    "into a new --targets), or pass --corrupt-targets skip to leave such samples out")
            if changed:
                warnings.append(f"skipped: {changed}")
                continue
            if not cfg.teacher_views:
                stored = self._read_targets(unit, row, k, warnings)
                if stored is None:
                    continue
                targets.append(stored)
            if not (cfg.device_decode and row not in unit.host_rows and views.add_jpeg(data, unit.view_int[row, k],
                                                                                        unit.view_float[row, k])):
                views.add(decode_image(data), unit.view_int[row, k], unit.view_float[row, k])
            masks.append(torch.from_numpy(masker(sample_rng(cfg.seed, self.epoch, key))))
            keys.append(key)
            chosen.append(k)
        if not keys:
            raise CorruptTarget("every sample of a batch failed its checksum or its image's; run `cae2 verify-targets "
                                "--shards` on the store")
        out = {"mask": torch.stack(masks), "keys": keys, "views": chosen, "warnings": warnings, **views.batch()}
        if targets:  # float16, or int8 with "target_scales" (dequantised on the device)
            out["targets"] = torch.stack([torch.from_numpy(latents) for latents, _ in targets])
            if targets[0][1] is not None:
                out["target_scales"] = torch.stack([torch.from_numpy(scales) for _, scales in targets])
        return out

    def _read_targets(self, unit, row: int, k: int, warnings: list[str]) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A sample's stored view (latents, int8 scales or None); None: it failed its checksum and is skipped
        (the batch's "warnings" say so: the training process logs them)."""
        try:
            return unit.read_stored(row, k, check=self.cfg.corrupt_targets != "off")
        except CorruptTarget as e:
            if self.cfg.corrupt_targets == "stop":
                raise
            warnings.append(f"skipped: {e}")
            return None


class PillowViewBatch:
    """Pillow view path: the worker cuts each sample's view (and the teacher's, for --teacher-online)."""

    def __init__(self, cfg: StreamConfig, meta: StoreMeta, same_views: bool):
        self.cfg, self.meta, self.same_views = cfg, meta, same_views
        self.images: list[torch.Tensor] = []
        self.teacher_images: list[torch.Tensor] = []

    def add(self, image, ints: np.ndarray, floats: np.ndarray) -> None:
        self.images.append(render_view(image, ints, floats, self.cfg.student_size, self.cfg.student_interpolation))
        if self.cfg.teacher_views:
            self.teacher_images.append(self.images[-1] if self.same_views else
                                       render_view(image, ints, floats, self.meta.input_size, self.meta.interpolation))

    def batch(self) -> dict:
        out = {"images": torch.stack(self.images)}
        if self.cfg.teacher_views:
            out["teacher_images"] = torch.stack(self.teacher_images)
        return out


class DeviceViewBatch:
    """Device view path: the worker copies each sample's crop box (unflipped) and packs the batch's crops
    into one buffer with their records; the training device cuts the views (`DeviceViews.render`)."""

    def __init__(self, cfg: StreamConfig, meta: StoreMeta, same_views: bool):
        self.cfg, self.meta, self.same_views = cfg, meta, same_views
        self.crops: list[np.ndarray] = []
        self.ints: list[np.ndarray] = []
        self.floats: list[np.ndarray] = []
        self.jpegs: list[torch.Tensor] = []  # --decoder device: whole JPEG files, decoded on the device
        self.jpeg_at: list[int] = []  # their places in the batch

    def add(self, image, ints: np.ndarray, floats: np.ndarray) -> None:
        if len(ints) < N_INT:  # a schema-1 store kept no contrast means: measured here, on the whole image
            ints = measure_view(ViewParams.from_record(ints, floats), image).to_record()[0]
        crop, ints = crop_record(image, ints)
        self.crops.append(crop)
        self.ints.append(ints)
        self.floats.append(floats)

    def add_jpeg(self, data: bytes, ints: np.ndarray, floats: np.ndarray) -> bool:
        """Hand on the JPEG file with the view's record (whole-image frame); False: a device decoder does not
        take it, or the record lacks its contrast mean (decode on the host instead)."""
        if len(ints) < N_INT or device_decodable(data).host_reason is not None:
            return False
        self.jpeg_at.append(len(self.ints))
        self.jpegs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self.ints.append(np.asarray(ints, dtype=np.int32))
        self.floats.append(floats)
        return True

    def batch(self) -> dict:
        out = {"view_pack": PackedImages.pack(self.crops), "view_ints": torch.from_numpy(np.stack(self.ints)),
               "view_floats": torch.from_numpy(np.stack(self.floats))}
        if self.jpegs:
            out["view_jpegs"], out["view_jpeg_at"] = self.jpegs, torch.tensor(self.jpeg_at, dtype=torch.int64)
        if self.cfg.teacher_views and not self.same_views:
            out["teacher_from_pack"] = True  # the teacher's view of the same crops, at its own size
        return out


VIEW_BATCHES = {"pillow": PillowViewBatch, "device": DeviceViewBatch}


def _shuffled(items, size: int, rng: np.random.Generator):
    """Bounded shuffle buffer with an explicit generator (deterministic for a given input order)."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def start_loader(loader: DataLoader):
    """iter(loader), with the forked workers sharing as much of this process's memory as they can.

    A worker forked from a process that has been training inherits its free-but-mapped heap, and its
    own allocations land there as copy-on-write copies (~560 MiB PSS per worker instead of ~280 on
    ViT-Tiny), so the free heap goes back to the OS first (glibc's malloc_trim; a no-op elsewhere).
    """
    if not loader.num_workers:
        return iter(loader)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    return iter(loader)


def make_loader(store_path: str, meta: StoreMeta, index: list[ShardIndex], cfg: StreamConfig, model_cfg,
                epoch: int, skip_batches: int = 0, pin_memory: bool = False) -> tuple[DataLoader, EpochPlan]:
    plan = plan_epoch(index, cfg, epoch)
    stream = TrainStream(store_path, meta, plan, cfg, model_cfg, epoch, skip_batches)
    # Its own generator: creating the iterator must not consume the global RNG that drop path uses,
    # or a resumed run (which creates one mid-epoch) would diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(_stable_int(LOADER_SALT, cfg.seed, epoch, cfg.rank))
    context = worker_context(store_path, *(i.shard.url for i in index)) if cfg.workers else None
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers, worker_init_fn=init_worker,
                        pin_memory=pin_memory, prefetch_factor=4 if cfg.workers else None,
                        persistent_workers=False, generator=generator, multiprocessing_context=context)
    return loader, plan
