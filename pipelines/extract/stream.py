"""Stage 1's data-loader side: each worker claims a unit, reads its whole shard, decodes each image
once and yields its K views (or the decoded image, for the device view path) as messages.

Per unit a worker yields `NotMine` (complete, or another live process holds it), `ShardError`, or
`UnitStart` followed by one `ImageViews` or `Skip` per sample, in shard order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cae2.errors import UserError
from pipelines.shards import Shard, image_bytes, image_crc, iter_shard, shard_identity
from targets.claims import STALE_AFTER, Holder, release, try_claim
from targets.decoders import device_decodable
from targets.store import TargetStore
from targets.views import DecodeError, ViewSettings, apply_view, decode_image, measure_view, sample_view


@dataclass
class UnitStart:
    shard: Shard
    keys: list[str]
    identity: dict | None  # the shard file's size, mtime and crc32c (`shard_identity`)
    image_crc: list[int]  # crc32c of each sample's image bytes (0: no image), checked by stage 2 and verify


@dataclass
class ImageViews:
    unit: str
    row: int
    views: torch.Tensor | None  # [K, 3, S, S] uint8 (the teacher normalises); None until cut (device path)
    view_int: np.ndarray  # [K, 10]
    view_float: np.ndarray  # [K, 4]
    image_hw: tuple[int, int]
    image: torch.Tensor | None = None
    """Device path: the decoded image, uint8 [H, W, 3]; its views' contrast means are measured on the device."""
    means: torch.Tensor | None = None
    """Device path: the K contrast means measured on the device (host memory), for the records."""
    jpeg: torch.Tensor | None = None
    """Device decoder: the JPEG file, uint8 [bytes], decoded on the teacher's device with its batch."""
    host_reason: str | None = None
    """Device decoder: why Pillow decoded this image instead (recorded in the unit's marker)."""

    def records(self) -> tuple[np.ndarray, np.ndarray]:
        """The K views' records as the store keeps them (device path: with the measured contrast means)."""
        if self.means is not None:
            self.view_int[:, -1] = self.means.numpy()
        return self.view_int, self.view_float


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


@dataclass(frozen=True)
class ViewRecipe:
    """How a worker makes an image's views."""

    settings: ViewSettings
    seed: int
    k: int
    size: int
    interpolation: str
    device_views: bool = False
    """Hand on the decoded image; the main process cuts the views on the teacher's device."""
    device_decode: bool = False
    """Hand on the JPEG file of every image a device decoder takes (`device_decodable`), undecoded."""


class UnitViewStream(IterableDataset):
    """Worker w of W takes units w, w + W, ...; it claims each one in `store` (when given) before
    reading it, and each image is decoded once for all its K views."""

    def __init__(self, shards: list[Shard], recipe: ViewRecipe, store: str | None = None,
                 holder: Holder | None = None, claim_timeout: float = STALE_AFTER):
        self.shards, self.recipe = shards, recipe
        self.store, self.claim_timeout = store, claim_timeout
        self.holder = holder or Holder.me()

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        store = TargetStore.open(self.store) if self.store else None
        for shard in self.shards[wid::nw]:
            if store is not None:
                taken = self._claim(store, shard)
                if taken is not None:
                    yield taken
                    continue
            try:
                samples = list(iter_shard(shard.url))  # whole shard: the row count is known up front
                identity = shard_identity(shard.url)  # the file is in the page cache now
            except UserError as e:
                yield ShardError(shard, str(e))
                continue
            yield UnitStart(shard, [s["__key__"] for s in samples], identity, [image_crc(s) for s in samples])
            for row, sample in enumerate(samples):
                yield self._views(shard.name, row, sample)

    def _claim(self, store: TargetStore, shard: Shard) -> NotMine | None:
        """Claim the unit first, then make sure nobody finished it meanwhile; None: it is ours."""
        claim = store.claim_path(shard.name)
        got, other = try_claim(claim, self.holder, self.claim_timeout)
        if not got:
            return NotMine(shard, other)
        if store.is_complete(shard.name):
            release(claim, self.holder)
            return NotMine(shard, None)
        return None

    def _views(self, unit: str, row: int, sample: dict) -> ImageViews | Skip:
        key, r = sample["__key__"], self.recipe
        data = image_bytes(sample)
        if data is None:
            names = [k for k in sample if not k.startswith("__")]
            split = [k for k in names if "." in k]
            hint = (f"; member names are split at their first dot (KEY.{split[0]} is key KEY with field {split[0]}): "
                    "name members KEY.jpg") if split else ""
            return Skip(unit, row, key, f"no image field (has: {', '.join(names) or 'none'}){hint}")
        info = device_decodable(data) if r.device_decode else None
        image = None
        if info is None or info.host_reason is not None:
            try:
                image = decode_image(data)
            except DecodeError as e:
                return Skip(unit, row, key, str(e))
        if image is not None:
            hw = (image.height, image.width)
        else:
            assert info is not None  # decoded later on the device: its size comes from the header
            hw = (info.height, info.width)
        params = [sample_view(r.settings, r.seed, key, k, hw) for k in range(r.k)]
        if not r.device_views:  # the device path measures the contrast means itself
            assert image is not None  # the Pillow view path decodes every image here
            params = [measure_view(p, image) for p in params]
        view_int, view_float = _records(params)
        if image is None:  # a device decoder takes it: only its header was read here
            return ImageViews(unit, row, None, view_int, view_float, hw,
                              jpeg=torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if r.device_views:
            return ImageViews(unit, row, None, view_int, view_float, hw, torch.from_numpy(np.asarray(image)),
                              host_reason=info.host_reason if info else None)
        views = torch.stack([apply_view(image, p, r.size, r.interpolation) for p in params])
        return ImageViews(unit, row, views, view_int, view_float, hw)


def _records(params: list) -> tuple[np.ndarray, np.ndarray]:
    records = [p.to_record() for p in params]
    return np.stack([rec[0] for rec in records]), np.stack([rec[1] for rec in records])
