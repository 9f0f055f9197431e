"""Direct access to the block files of a local, uncompressed `latents` array, and the checksum of a
unit's latents.

A block is `images_per_shard` consecutive rows of a unit (all their K views), stored as one file:
what Zarr v3 calls a shard of a sharded array (cae2 says "block" so that "shard" means a WebDataset
tar shard only). zarr-python spends ~1.4 ms on one small chunk read of a sharded array (it re-reads
the index every time) and ~3.5 ms per MB on a whole-block write (its codec pipeline handles each
inner chunk on its own). The layout cae2 writes is simple enough to read and write as bytes: a block
file (Zarr v3 sharding codec, index at the end) is the inner chunks (one view each) back to back, then
one little-endian (offset, nbytes) uint64 pair per inner chunk, then the crc32c of that index. Both
classes are used only when the array's metadata is exactly this layout; anything else goes through
zarr.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from cae2.errors import UserError, naming

EMPTY = np.uint64(2**64 - 1)  # index entry of an inner chunk that is not stored (zarr: equal to the fill value)
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]
_INDEX_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


_DTYPES = {"float16": "<f2", "float32": "<f4", "int8": "i1"}  # what cae2 stores per view


def _layout(array: zarr.Array, store_path: str, array_path: str) -> tuple[Path, tuple, int, np.dtype] | None:
    """(array folder, shape, rows per block, dtype) when the array is a local [N, K, ...] array of one
    of `_DTYPES` sharded as cae2 writes it (one view per inner chunk, K views of `rows` images per
    block): the latents [N, K, T, D] and, for int8 latents, their scales [N, K, T]."""
    if "://" in store_path:
        return None
    folder = Path(store_path) / array_path
    meta = json.loads((folder / "zarr.json").read_text())
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed" or meta.get("data_type") not in _DTYPES:
        return None
    conf = codecs[0]["configuration"]
    k, view = array.shape[1], list(array.shape[2:])
    inner = _CODECS if meta["data_type"] != "int8" else [{"name": "bytes"}]  # one-byte values have no endianness
    if conf.get("codecs") != inner or conf.get("index_codecs") != _INDEX_CODECS \
            or conf.get("index_location", "end") != "end" or conf.get("chunk_shape") != [1, 1, *view] \
            or meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}} \
            or meta["chunk_grid"]["configuration"]["chunk_shape"][1:] != [k, *view]:
        return None
    return folder, array.shape, meta["chunk_grid"]["configuration"]["chunk_shape"][0], \
        np.dtype(_DTYPES[meta["data_type"]])


def _block_file(folder: Path, block: int, ndim: int) -> Path:
    """The file of block `block` (zarr's block (block, 0, ..., 0)) of an ndim-dimensional array."""
    return folder.joinpath("c", str(block), *["0"] * (ndim - 1))


class DamagedBlock(UserError):
    """A block file that is not what cae2 wrote (cut short, a damaged index)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path} is damaged: {problem}; delete its unit's folder (the folder under units/) and "
                         "rerun the command that wrote the store (extract-targets or convert-targets) with the same "
                         "options to rewrite it")


class BlockFileReader:
    """Reads single views: each block file's index once, then one pread per view."""

    def __init__(self, folder: Path, shape: tuple, block_rows: int, dtype: np.dtype = np.dtype("<f2")):
        self.dir, self.shape, self.block_rows, self.dtype = folder, shape, block_rows, dtype
        self.view_bytes = int(np.prod(shape[2:])) * dtype.itemsize
        self._index: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}

    @classmethod
    def for_array(cls, array: zarr.Array, store_path: str, array_path: str) -> BlockFileReader | None:
        layout = _layout(array, store_path, array_path)
        return cls(*layout) if layout else None

    def _fd(self, block: int) -> int:
        """The block file's descriptor, -1 where zarr stored no file (every view equal to the fill value)."""
        fd = self._fds.get(block)
        if fd is None:
            n = self.block_rows * self.shape[1]
            try:
                fd = os.open(_block_file(self.dir, block, len(self.shape)), os.O_RDONLY)
            except FileNotFoundError:
                fd, index = -1, np.full((n, 2), EMPTY, dtype="<u8")
            else:
                index = self._read_index(fd, block, n)
            self._fds[block], self._index[block] = fd, index
        return fd

    def _read_index(self, fd: int, block: int, n: int) -> np.ndarray:
        """The block file's index of n (offset, nbytes) pairs, checked against its crc32c and the file size."""
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 16 * n + 4, size - 16 * n - 4) if size >= 16 * n + 4 else b""
        if len(raw) != 16 * n + 4 or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            os.close(fd)
            raise DamagedBlock(_block_file(self.dir, block, len(self.shape)), f"its index does not read ({size} bytes)")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n, 2)
        stored = index[:, 0] != EMPTY
        if (index[stored, 0] + index[stored, 1] > np.uint64(size - 16 * n - 4)).any():
            os.close(fd)
            raise DamagedBlock(_block_file(self.dir, block, len(self.shape)), f"its views run past its {size} bytes")
        return index

    def read(self, row: int, view: int) -> np.ndarray:
        with naming(_block_file(self.dir, row // self.block_rows, len(self.shape))):
            return self._read(row, view)

    def _read(self, row: int, view: int) -> np.ndarray:
        block, local = divmod(row, self.block_rows)
        fd = self._fd(block)
        offset, nbytes = self._index[block][local * self.shape[1] + view]
        if offset == EMPTY and nbytes == EMPTY:  # a chunk equal to the fill value is not stored
            return np.zeros(self.shape[2:], dtype=self.dtype)
        if nbytes != self.view_bytes:
            raise DamagedBlock(_block_file(self.dir, block, len(self.shape)),
                               f"view ({row}, {view}) has {nbytes} bytes, expected {self.view_bytes}")
        data = bytearray(os.pread(fd, int(nbytes), int(offset)))  # writable: torch.from_numpy shares it
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape[2:])

    def read_block(self, block: int) -> np.ndarray:
        """Every view of one block's rows, [rows, K, ...]: one read when the views lie back to back in
        row order (as cae2 writes them), else one read per view."""
        with naming(_block_file(self.dir, block, len(self.shape))):
            return self._read_block(block)

    def _read_block(self, block: int) -> np.ndarray:
        start = block * self.block_rows
        rows = min(self.block_rows, self.shape[0] - start)
        out = np.empty((rows, *self.shape[1:]), dtype=self.dtype)
        fd = self._fd(block)
        n = rows * self.shape[1]
        index = self._index[block][:n]
        if (index[:, 1] == self.view_bytes).all() and \
                (index[:, 0] == np.arange(n, dtype=np.uint64) * np.uint64(self.view_bytes)).all():
            buf, done = memoryview(out.data).cast("B"), 0
            while done < len(buf):
                got = os.preadv(fd, [buf[done:]], done)
                if got == 0:
                    raise DamagedBlock(_block_file(self.dir, block, len(self.shape)),
                                       "the file ends before its views do")
                done += got
            return out
        for r in range(rows):
            for v in range(self.shape[1]):
                out[r, v] = self.read(start + r, v)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            if fd >= 0:
                os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


class BlockFileWriter:
    """Writes whole blocks as one file each: the rows' views in order, then the index and its crc32c.
    Like zarr's local store it writes a `.partial` file and renames it, so a block file is whole or absent."""

    def __init__(self, folder: Path, shape: tuple, block_rows: int, dtype: np.dtype = np.dtype("<f2")):
        self.dir, self.shape, self.block_rows, self.dtype = folder, shape, block_rows, dtype
        self.view_bytes = int(np.prod(shape[2:])) * dtype.itemsize

    @classmethod
    def for_array(cls, array: zarr.Array, store_path: str, array_path: str) -> BlockFileWriter | None:
        layout = _layout(array, store_path, array_path)
        return cls(*layout) if layout else None

    def write(self, block: int, data: bytes) -> None:
        """`data`: the C-order bytes of rows [block * block_rows, ...) (all of them but in the last block)."""
        n_views = len(data) // self.view_bytes
        index = np.full((self.block_rows * self.shape[1], 2), EMPTY, dtype="<u8")
        index[:n_views, 0] = np.arange(n_views, dtype=np.uint64) * self.view_bytes
        index[:n_views, 1] = self.view_bytes
        raw = index.tobytes()
        path = _block_file(self.dir, block, len(self.shape))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(raw)
            f.write(google_crc32c.value(raw).to_bytes(4, "little"))
        os.replace(tmp, path)


class LatentsChecksum:
    """Running checksum of a unit's latents bytes in row order, as its completion marker records it:
    `crc32c:<8 hex>` (C-accelerated, ~6 GB/s); older stores record `blake2b-128:<32 hex>`,
    which verifies the same way."""

    KINDS = ("crc32c", "blake2b-128")

    def __init__(self, kind: str = "crc32c"):
        if kind not in self.KINDS:
            raise ValueError(f"unknown latents checksum {kind!r} (known: {', '.join(self.KINDS)})")
        self.kind = kind
        self._crc = 0
        self._blake = hashlib.blake2b(digest_size=16) if kind == "blake2b-128" else None

    @classmethod
    def like(cls, recorded: str) -> LatentsChecksum:
        """A fresh checksum of the kind that `recorded` (a marker's value) was made with."""
        return cls(recorded.split(":", 1)[0])

    def update(self, data: bytes) -> None:
        if self._blake is not None:
            self._blake.update(data)
        else:
            self._crc = google_crc32c.extend(self._crc, data)

    def value(self) -> str:
        digest = self._blake.hexdigest() if self._blake is not None else f"{self._crc:08x}"
        return f"{self.kind}:{digest}"


def view_checksum(latents: np.ndarray, scales: np.ndarray | None = None) -> int:
    """crc32c of one view's stored bytes (latents, then int8 scales): ~8 us for a ViT-B/16 view."""
    crc = google_crc32c.value(np.ascontiguousarray(latents).tobytes())
    if scales is not None:
        crc = google_crc32c.extend(crc, np.ascontiguousarray(scales).tobytes())
    return crc
