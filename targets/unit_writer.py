"""Writing one unit of a target store: whole blocks of latents as their rows complete (as bytes on local
stores, `targets.block_files`), then the small arrays, then the completion marker, last."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import zarr

from cae2.errors import naming
from targets.block_files import BlockFileWriter, LatentsChecksum, view_checksum
from targets.store_meta import N_FLOAT, N_INT
from targets.unit_files import unit_files
from targets.unit_reader import MARKER_ATTR, UnitReader


class UnitWriter:
    """Writes one unit: whole blocks of latents as rows complete, then metadata and the marker."""

    def __init__(self, group: zarr.Group, folder: Path, latents: zarr.Array, keys: list[str], k: int,
                 rows_per_block: int, view_path: str = "pillow", direct: BlockFileWriter | None = None,
                 scales: zarr.Array | None = None, direct_scales: BlockFileWriter | None = None,
                 source_identity: dict | None = None):
        self.group, self.folder = group, folder
        self.latents, self.scales = latents, scales
        self._direct = direct  # whole block files written as bytes (local stores); else through zarr
        self._direct_scales = direct_scales
        self.keys = keys
        n = len(keys)
        self.view_int = np.zeros((n, k, N_INT), np.int32)
        self.view_float = np.zeros((n, k, N_FLOAT), np.float32)
        self.image_hw = np.zeros((n, 2), np.int32)
        self.valid = np.zeros(n, bool)
        self.view_crc = np.zeros((n, k), np.uint32)  # crc32c of each view's stored bytes, checked on reads
        self.image_crc: np.ndarray | None = None  # crc32c of each sample's image bytes, checked by stage 2
        self.skipped: list[dict] = []
        self.host_decoded: list[dict] = []
        self.view_path = view_path
        self.source_identity = source_identity
        self.rows_per_block = rows_per_block
        self._checksum = LatentsChecksum()
        self._written = 0

    def set_view_params(self, row: int, view_int: np.ndarray, view_float: np.ndarray,
                        image_hw: tuple[int, int]) -> None:
        """Record the K views' parameters of a valid row (`ViewParams.to_record` of each)."""
        self.view_int[row], self.view_float[row], self.image_hw[row] = view_int, view_float, image_hw
        self.valid[row] = True

    def decoded_on_host(self, row: int, reason: str) -> None:
        """Record a row whose image Pillow decoded, not the store's device decoder (`targets.decoders`)."""
        self.host_decoded.append({"row": row, "reason": reason})

    def skip(self, row: int, key: str, reason: str) -> None:
        """Record a sample stage 1 could not use (its latents stay zero, `valid` False)."""
        self.skipped.append({"key": key, "row": row, "reason": reason})

    def copy_records(self, unit: UnitReader) -> None:
        """Take every row's view parameters, validity and skip records, and the identity of the shard they
        came from, from another store's unit."""
        self.valid[:], self.view_int[:], self.view_float[:], self.image_hw[:] = \
            unit.valid, unit.view_int, unit.view_float, unit.image_hw
        self.skipped = list(unit.marker["skipped"])
        self.host_decoded = list(unit.marker.get("decoded_on_host", []))
        self.source_identity = unit.marker.get("source_identity")
        self.image_crc = None if unit.image_crc is None else unit.image_crc.copy()

    def write_rows(self, start: int, latents: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Write rows [start, start + len) of latents (float16, or int8 with their float32 scales); must
        be whole blocks in order (the last one may be short)."""
        stop = start + len(latents)
        if start != self._written or (start % self.rows_per_block) or \
                (len(latents) != self.rows_per_block and stop != len(self.keys)):
            raise ValueError(f"rows {start}:{stop} are not the next whole block")
        if (scales is None) != (self.scales is None):
            raise ValueError("int8 latents are written with their scales, float16 latents without")
        parts: list[tuple[zarr.Array, BlockFileWriter | None, np.ndarray]] = [
            (self.latents, self._direct, np.ascontiguousarray(latents, dtype=self.latents.dtype))]
        if scales is not None and self.scales is not None:
            parts.append((self.scales, self._direct_scales, np.ascontiguousarray(scales, dtype="<f4")))
        for r in range(len(latents)):
            for v in range(latents.shape[1]):
                self.view_crc[start + r, v] = view_checksum(parts[0][2][r, v], None if scales is None
                                                            else parts[1][2][r, v])
        for array, direct, values in parts:
            data = values.tobytes()
            with naming(self.folder / array.basename):
                if direct is not None:
                    direct.write(start // self.rows_per_block, data)
                else:
                    array[start:stop] = values
            self._checksum.update(data)
        self._written = stop

    def finish(self, source: str, quantization: dict | None = None, writer: dict | None = None) -> dict:
        """Write the small arrays, then the marker (last). `writer`: host, pid, job of the writing process."""
        if self._written != len(self.keys):
            raise ValueError(f"unit finished after {self._written} of {len(self.keys)} rows")
        with naming(self.folder):
            return self._finish(source, quantization, writer)

    def _finish(self, source: str, quantization: dict | None, writer: dict | None) -> dict:
        g = self.group
        n = len(self.keys)
        g.create_array("keys", shape=(n,), dtype=str)[:] = np.array(self.keys, dtype=str) if n else np.array([], str)
        for name, data in (("valid", self.valid), ("view_int", self.view_int), ("view_float", self.view_float),
                           ("image_hw", self.image_hw), ("view_crc32c", self.view_crc),
                           *([("image_crc32c", self.image_crc)] if self.image_crc is not None else [])):
            arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape if n else "auto")
            if n:
                arr[...] = data
        marker = {
            "num_samples": n,
            "files": unit_files(self.folder),
            "num_valid": int(self.valid.sum()),
            "skipped": sorted(self.skipped, key=lambda d: d["row"]),  # a device decoder's failures come later
            **({"decoded_on_host": sorted(self.host_decoded, key=lambda d: d["row"])} if self.host_decoded else {}),
            "checksum": self._checksum.value(),
            "source": source,
            **({"source_identity": self.source_identity} if self.source_identity else {}),
            "view_path": self.view_path,
            **({"writer": writer} if writer else {}),
            **({"quantization": quantization} if quantization else {}),
            "completed": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        g.attrs[MARKER_ATTR] = marker  # last write: the unit counts only from here on
        return marker
