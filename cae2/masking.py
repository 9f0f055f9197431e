"""Mask generators: an exact number of masked patches per image, from an explicit numpy Generator.

Every generator is a pure function of the Generator it is given, so data-loader workers seed
one per sample or batch and never touch global RNG state.
"""

from __future__ import annotations

import math

import numpy as np

from cae2.config import MaskStrategy, ModelConfig


class BlockMaskGenerator:
    """BEiT block-wise masking (min block 16 patches, aspect 0.3..1/0.3) with an exact count.

    Blocks are placed as in BEiT; when no block fits the remaining budget within `attempts`
    tries, the remainder is filled with single random patches, so the count is always exact and
    the loop always terminates (at most `num_masked` rounds).
    """

    def __init__(self, grid: tuple[int, int], num_masked: int, min_block: int = 16, min_aspect: float = 0.3,
                 attempts: int = 10):
        h, w = grid
        if not 0 < num_masked < h * w:
            raise ValueError(f"num_masked must be in 1..{h * w - 1} for a {h}x{w} grid, got {num_masked}")
        self.height, self.width = h, w
        self.num_masked = num_masked
        self.min_block = min_block
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.attempts = attempts

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        lo = min(self.min_block, budget)
        for _ in range(self.attempts):
            area = rng.uniform(lo, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if not (0 < bh < self.height and 0 < bw < self.width) or bh * bw < lo:
                continue
            top = int(rng.integers(0, self.height - bh + 1))
            left = int(rng.integers(0, self.width - bw + 1))
            window = mask[top:top + bh, left:left + bw]
            new = bh * bw - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """-> bool [h * w], True = masked, exactly `num_masked` True."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._place_block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        flat = mask.reshape(-1)
        if count < self.num_masked:
            free = np.flatnonzero(~flat)
            flat[rng.choice(free, self.num_masked - count, replace=False)] = True
        return flat


class RandomMaskGenerator:
    """Uniformly random patches (the ablation of Table 4), exact count."""

    def __init__(self, grid: tuple[int, int], num_masked: int):
        self.num_patches = grid[0] * grid[1]
        if not 0 < num_masked < self.num_patches:
            raise ValueError(f"num_masked must be in 1..{self.num_patches - 1}, got {num_masked}")
        self.num_masked = num_masked

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.choice(self.num_patches, self.num_masked, replace=False)] = True
        return mask


def create_mask_generator(cfg: ModelConfig) -> BlockMaskGenerator | RandomMaskGenerator:
    if cfg.mask_strategy == MaskStrategy.block:
        return BlockMaskGenerator(cfg.grid_size, cfg.num_masked, min_block=cfg.mask_min_block)
    return RandomMaskGenerator(cfg.grid_size, cfg.num_masked)
