import numpy as np
import pytest

import cae2
from cae2.masking import BlockMaskGenerator, RandomMaskGenerator

REAL = ["cae2_vit_tiny", "cae2_vit_small", "cae2_vit_base", "cae2_vit_large"]


def _largest_component(mask2d: np.ndarray) -> int:
    h, w = mask2d.shape
    seen = np.zeros_like(mask2d)
    best = 0
    for i in range(h):
        for j in range(w):
            if mask2d[i, j] and not seen[i, j]:
                stack, size = [(i, j)], 0
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    size += 1
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        x, y = a + da, b + db
                        if 0 <= x < h and 0 <= y < w and mask2d[x, y] and not seen[x, y]:
                            seen[x, y] = True
                            stack.append((x, y))
                best = max(best, size)
    return best


@pytest.mark.parametrize("name", REAL + ["cae2_debug"])
def test_exact_count_every_draw(name):
    cfg = cae2.get_preset(name).model
    gen = cae2.create_mask_generator(cfg)
    rng = np.random.default_rng(1)
    counts = {int(gen(rng).sum()) for _ in range(3000)}
    assert counts == {cfg.num_masked}
    assert cfg.num_masked == {"cae2_vit_tiny": 30, "cae2_vit_small": 49, "cae2_vit_base": 98,
                              "cae2_vit_large": 118, "cae2_debug": 8}[name]


@pytest.mark.parametrize("name", REAL)
def test_blocks_of_at_least_16_patches(name):
    cfg = cae2.get_preset(name).model
    gen = cae2.create_mask_generator(cfg)
    rng = np.random.default_rng(2)
    for _ in range(300):
        assert _largest_component(gen(rng).reshape(cfg.grid_size)) >= 16


def test_random_masking_is_not_blockwise():
    gen = RandomMaskGenerator((14, 14), 30)
    rng = np.random.default_rng(0)
    sizes = [_largest_component(gen(rng).reshape(14, 14)) for _ in range(200)]
    assert np.mean(sizes) < 8


def test_same_seed_same_masks_no_global_rng():
    gen = BlockMaskGenerator((14, 14), 98)
    a = [gen(np.random.default_rng(7)) for _ in range(5)]
    np.random.seed(123)
    import random

    random.seed(5)
    b = [gen(np.random.default_rng(7)) for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(gen(np.random.default_rng(7)), gen(np.random.default_rng(8)))


def test_terminates_on_tiny_budgets_and_grids():
    for grid, n in [((2, 2), 3), ((4, 4), 1), ((4, 4), 15), ((3, 7), 10), ((14, 14), 195)]:
        gen = BlockMaskGenerator(grid, n)
        rng = np.random.default_rng(0)
        assert all(gen(rng).sum() == n for _ in range(50))
    with pytest.raises(ValueError):
        BlockMaskGenerator((4, 4), 16)


@pytest.mark.parametrize("strategy", ["block", "random"])
def test_no_gross_positional_bias(strategy):
    cfg = cae2.resolve_model_config("cae2_vit_base", mask_strategy=strategy)
    gen = cae2.create_mask_generator(cfg)
    rng = np.random.default_rng(3)
    freq = np.stack([gen(rng) for _ in range(4000)]).mean(0).reshape(14, 14)
    rel = freq / freq.mean()
    # symmetric under flips and transposition: no directional bias
    for other in (rel[::-1], rel[:, ::-1], rel.T):
        assert np.abs(other - rel).max() < 0.15
    if strategy == "random":
        assert rel.min() > 0.8 and rel.max() < 1.2
    else:  # BEiT blocks favour the centre; every position is still masked regularly
        assert rel.min() > 0.08 and rel.max() < 2.5
