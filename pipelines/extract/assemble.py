"""A unit's rows arrive in any order; the writer wants whole blocks (zarr shard files) in row order."""

from __future__ import annotations

import numpy as np

from targets.quantize import QuantStats
from targets.store_meta import StoreMeta
from targets.unit_writer import UnitWriter


class UnitAssembler:
    """Collects one unit's rows (any order), hands whole blocks to the writer in row order."""

    def __init__(self, writer: UnitWriter, source: str, meta: StoreMeta):
        self.writer, self.source = writer, source
        n = len(writer.keys)
        self.resolved = np.zeros(n, bool)
        self.rows_per_block = meta.images_per_shard
        rows = min(n, self.rows_per_block)
        self.shapes: dict[str, tuple[int, ...]] = {
            "latents": (rows, meta.views_per_image, meta.num_tokens, meta.latent_dim)}
        self.dtypes: dict[str, type] = {"latents": np.int8 if meta.latent_format == "int8" else np.float16}
        if meta.latent_format == "int8":
            self.shapes["scales"], self.dtypes["scales"] = (rows, meta.views_per_image, meta.num_tokens), np.float32
        self.blocks: dict[int, dict[str, np.ndarray]] = {}  # block -> its arrays, until handed out
        self.quant = QuantStats()
        self.next_row = 0

    def put(self, row: int, latents: np.ndarray | None, scales: np.ndarray | None = None) -> list[tuple]:
        """Record a row (None = skipped); returns the blocks now ready: [(start_row, latents, scales or None)]."""
        index, local = divmod(row, self.rows_per_block)
        block = self.blocks.get(index)
        if block is None:
            block = self.blocks[index] = {name: np.zeros(shape, self.dtypes[name])
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
            if self.next_row % self.rows_per_block == 0 or self.next_row == n:
                index = (self.next_row - 1) // self.rows_per_block
                done = self.blocks.pop(index)  # the writer owns it now
                start = index * self.rows_per_block
                rows = self.next_row - start
                ready.append((start, done["latents"][:rows], done["scales"][:rows] if "scales" in done else None))
        return ready

    @property
    def done(self) -> bool:
        return self.next_row == len(self.resolved)
