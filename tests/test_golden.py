"""Golden values: stores outlive code. Fixed seeds and keys must keep giving the view parameters, view
indices and masks that existing target stores and resumed runs were made with (tests/golden.json).

A change here means every existing store disagrees with stage 2. Regenerate only for a deliberate,
documented break of store compatibility: `python -m tests.test_golden --regenerate`.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

import cae2
from cae2.masking import create_mask_generator
from pipelines.pretrain.data import sample_rng, view_index
from targets.views import ViewSettings, sample_view

GOLDEN = Path(__file__).with_name("golden.json")
KEYS = ["n01440764_10026", "000123_img", "it's \"quoted\"", "ILSVRC2012_val_00049999", "k"]
SIZES = [(375, 500), (500, 333), (64, 64), (1, 1), (2448, 3264)]  # incl. the central fallback (1 x 1)


def current() -> dict:
    settings = [ViewSettings(), ViewSettings(hue=0.1, crop_scale=(0.08, 1.0)), ViewSettings.from_jitter(0.0)]
    views = [[s.to_dict(), seed, key, k, list(hw), sample_view(s, seed, key, k, hw).to_record()[0].tolist(),
              sample_view(s, seed, key, k, hw).to_record()[1].tolist()]
             for s in settings for seed in (0, 7) for key, hw in zip(KEYS, SIZES, strict=True) for k in (0, 4)]
    indices = [[seed, epoch, key, k, view_index(seed, epoch, key, k)]
               for seed in (0, 7) for epoch in (0, 1, 299) for key in KEYS for k in (1, 5, 10)]
    masks = []
    for preset in ("cae2_vit_tiny", "cae2_vit_base", "cae2_vit_large"):
        gen = create_mask_generator(cae2.resolve_model_config(preset))
        for seed, epoch, key in itertools.product((0, 7), (0, 5), [*KEYS, *(f"img{i}" for i in range(11))]):
            masks.append([preset, seed, epoch, key, np.packbits(gen(sample_rng(seed, epoch, key))).tobytes().hex()])
    return {"views": views, "view_indices": indices, "masks": masks}


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_view_parameters_are_unchanged():
    got, want = current()["views"], _golden()["views"]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == w, f"sample_view{tuple(w[1:5])} under {w[0]} changed: {w[5:]} -> {g[5:]}"


def test_view_indices_are_unchanged():
    assert current()["view_indices"] == _golden()["view_indices"]


def test_masks_are_unchanged():
    for g, w in zip(current()["masks"], _golden()["masks"], strict=True):
        assert g == w, f"the mask of {w[:4]} changed"


if __name__ == "__main__":
    if "--regenerate" not in sys.argv:
        raise SystemExit(__doc__)
    GOLDEN.write_text(json.dumps(current(), separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN}")
