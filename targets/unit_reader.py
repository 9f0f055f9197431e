"""Reading one complete unit of a target store: its small arrays held in memory, each view's latents read
on demand (as bytes on local stores, `targets.block_files`) and checked against its crc32c on request."""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr

from cae2.errors import UserError
from targets.block_files import BlockFileReader, view_checksum
from targets.quantize import dequantize
from targets.store_meta import N_FLOAT, N_INT
from targets.zarr_nodes import array, optional_array, record, values

MARKER_ATTR = "complete"


class CorruptTarget(UserError):
    """A cached view whose bytes differ from the ones written (their crc32c)."""


class ChangedSample(UserError):
    """A sample whose image bytes differ from the ones stage 1 read (their crc32c): its targets are another
    image's."""


class UnitReader:
    """Read side of one complete unit, with the small arrays held in memory (O(N) per unit)."""

    def __init__(self, group: zarr.Group, store_path: str = ""):
        self.group = group
        marker = record(group, MARKER_ATTR)
        if marker is None:
            raise ValueError(f"unit {group.path} has no completion marker: open it through TargetStore.unit")
        self.marker: dict[str, Any] = marker
        self.latents = array(group, "latents")
        self.scales = optional_array(group, "scales")  # int8 latents
        fast = bool(store_path) and self.latents.shape[0] > 0
        self._fast = BlockFileReader.for_array(self.latents, store_path, f"{group.path}/latents") if fast else None
        self._fast_scales = BlockFileReader.for_array(self.scales, store_path, f"{group.path}/scales") \
            if fast and self.scales is not None else None
        n = int(marker["num_samples"])
        self.keys: list[str] = [str(k) for k in values(group, "keys")] if n else []
        self.valid: np.ndarray = values(group, "valid") if n else np.zeros(0, bool)
        self.view_int: np.ndarray = values(group, "view_int") if n else np.zeros((0, 0, N_INT), np.int32)
        self.view_float: np.ndarray = values(group, "view_float") if n else np.zeros((0, 0, N_FLOAT), np.float32)
        self.image_hw: np.ndarray = values(group, "image_hw") if n else np.zeros((0, 2), np.int32)
        self.view_crc: np.ndarray | None = values(group, "view_crc32c") if n and "view_crc32c" in group else None
        """crc32c of each view's stored bytes (units written before they were recorded: None)."""
        self.image_crc: np.ndarray | None = values(group, "image_crc32c") if n and "image_crc32c" in group else None
        """crc32c of each sample's image bytes as stage 1 read them (units written before: None)."""
        self.host_rows = frozenset(d["row"] for d in marker.get("decoded_on_host", ()))
        """Rows whose image Pillow decoded, where the store's decoder is a device decoder."""

    @property
    def name(self) -> str:
        return self.group.path.rsplit("/", 1)[-1]

    def image_changed(self, row: int, data: bytes) -> str | None:
        """How a sample's image bytes differ from the ones its targets were made from; None: the same (or a unit
        written before image digests were recorded)."""
        if self.image_crc is None:
            return None
        now = google_crc32c.value(data)
        if now == int(self.image_crc[row]):
            return None
        return (f"shard {self.name} key {self.keys[row]}: its image is not the one the targets were made from "
                f"(crc32c {now:08x}, stage 1 read {int(self.image_crc[row]):08x})")

    def __len__(self) -> int:
        return len(self.keys)

    def read_stored(self, row: int, view: int, check: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """One view as stored: (float16 [1 + T, D], None) or (int8 [1 + T, D], float32 scales [1 + T]).
        check: compare its crc32c with the one written (units made before checksums per view: no check)."""
        latents = self._fast.read(row, view) if self._fast is not None else np.asarray(self.latents[row, view])
        scales = None
        if self.scales is not None:
            scales = self._fast_scales.read(row, view) if self._fast_scales is not None \
                else np.asarray(self.scales[row, view])
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
        step = (self.latents.shards or self.latents.chunks)[0]
        for block, start in enumerate(range(0, len(self), step)):
            latents = self._fast.read_block(block) if self._fast is not None \
                else np.asarray(self.latents[start:start + step])
            scales = None
            if self.scales is not None:
                scales = self._fast_scales.read_block(block) if self._fast_scales is not None \
                    else np.asarray(self.scales[start:start + step])
            yield start, latents, scales
