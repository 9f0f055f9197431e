"""Reading one complete unit of a target store: its small arrays held in memory, each view's latents read
on demand (as bytes on local stores, `targets.block_files`) and checked against its crc32c on request."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from cae2.errors import UserError
from targets.block_files import BlockFileReader, view_checksum
from targets.quantize import dequantize
from targets.store_meta import N_FLOAT, N_INT

MARKER_ATTR = "complete"


class CorruptTarget(UserError):
    """A cached view whose bytes differ from the ones written (their crc32c)."""


class UnitReader:
    """Read side of one complete unit, with the small arrays held in memory (O(N) per unit)."""

    def __init__(self, group: zarr.Group, store_path: str = ""):
        self.group = group
        self.marker = group.attrs[MARKER_ATTR]
        self.latents = group["latents"]
        self.scales = group.get("scales")  # int8 latents
        fast = store_path and self.latents.shape[0]
        self._fast = BlockFileReader.for_array(self.latents, store_path, f"{group.path}/latents") if fast else None
        self._fast_scales = BlockFileReader.for_array(self.scales, store_path, f"{group.path}/scales") \
            if fast and self.scales is not None else None
        self.keys = [str(k) for k in group["keys"][:]] if self.marker["num_samples"] else []
        n = len(self.keys)
        self.valid = group["valid"][:] if n else np.zeros(0, bool)
        self.view_int = group["view_int"][:] if n else np.zeros((0, 0, N_INT), np.int32)
        self.view_float = group["view_float"][:] if n else np.zeros((0, 0, N_FLOAT), np.float32)
        self.image_hw = group["image_hw"][:] if n else np.zeros((0, 2), np.int32)
        self.view_crc = group["view_crc32c"][:] if n and "view_crc32c" in group else None  # older units: none
        self.host_rows = frozenset(d["row"] for d in self.marker.get("decoded_on_host", ()))
        """Rows whose image Pillow decoded, where the store's decoder is a device decoder."""

    def __len__(self) -> int:
        return len(self.keys)

    def read_stored(self, row: int, view: int, check: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """One view as stored: (float16 [1 + T, D], None) or (int8 [1 + T, D], float32 scales [1 + T]).
        check: compare its crc32c with the one written (units made before checksums per view: no check)."""
        latents = self._fast.read(row, view) if self._fast is not None else self.latents[row, view]
        scales = None
        if self.scales is not None:
            scales = self._fast_scales.read(row, view) if self._fast_scales is not None else self.scales[row, view]
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
        step = self.latents.shards[0]
        for block, start in enumerate(range(0, len(self), step)):
            latents = self._fast.read_block(block) if self._fast is not None else self.latents[start:start + step]
            scales = None
            if self.scales is not None:
                scales = self._fast_scales.read_block(block) if self._fast_scales is not None \
                    else self.scales[start:start + step]
            yield start, latents, scales
