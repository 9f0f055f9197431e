"""The device view path (targets.device_views) on CPU tensors: bit-exact with the Pillow path, with the
plain-torch renderer and, under Triton's interpreter, with the kernels a GPU runs."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.demo import synthetic_image
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.shards import make_shards
from targets.device_views import DeviceViews, PackedImages, crop_record
from targets.store import TargetStore
from targets.teacher import TeacherSpec
from targets.view_inputs import vertical_first
from targets.views import ViewParams, ViewSettings, apply_view, measure_view, sample_view
from tests.fixtures import TINY_TEACHER, write_bad_images, write_good_images

ROOT = Path(__file__).resolve().parent.parent


def _images(n: int, seed: int = 0, high: int = 420) -> list[np.ndarray]:
    """Noise and smooth images, tall, wide, tiny and larger than the output (up- and downscaling)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(8, high, 2))
        if i % 3 == 0:
            out.append((rng.random((h, w, 3)) * 255).astype(np.uint8))
        else:
            out.append(synthetic_image(rng, h, w))
    return out


def _views(images, settings: ViewSettings, k: int = 3, seed: int = 0):
    """(params as sampled, params with their contrast means, owner image of each view)."""
    sampled, measured, owner = [], [], []
    for i, arr in enumerate(images):
        for v in range(k):
            p = sample_view(settings, seed, f"img{i}", v, arr.shape[:2])
            sampled.append(p)
            measured.append(measure_view(p, Image.fromarray(arr)))
            owner.append(i)
    return sampled, measured, owner


def _records(params):
    recs = [p.to_record() for p in params]
    return torch.from_numpy(np.stack([r[0] for r in recs])), torch.from_numpy(np.stack([r[1] for r in recs]))


def _pillow(images, params, owner, size, interpolation):
    return torch.stack([apply_view(Image.fromarray(images[i]), p, size, interpolation)
                        for i, p in zip(owner, params, strict=True)])


@pytest.mark.parametrize(("size", "interpolation"), [(224, "bicubic"), (64, "bicubic"), ((48, 80), "bilinear")])
def test_views_are_bit_identical_to_the_pillow_path(size, interpolation):
    images = _images(18)
    sampled, params, owner = _views(images, ViewSettings(crop_ratio=(0.3, 3.0)))  # tall and wide boxes too
    assert any(p.flip for p in params) and len({p.order for p in params}) > 8
    out_hw = (size, size) if isinstance(size, int) else size
    heights, widths = torch.tensor([p.height for p in params]), torch.tensor([p.width for p in params])
    assert set(vertical_first(heights, widths, out_hw).tolist()) == {False, True}  # both pass orders
    views = DeviceViews(size, interpolation)
    packed = PackedImages.pack(images)  # whole images of many sizes, back to back (jagged)
    ints, floats = _records(sampled)
    measured = views.measure(packed, owner, ints, floats)  # the contrast means, measured on the device
    assert torch.equal(measured, _records(params)[0])
    got = views.render(packed, owner, measured, floats)
    want = _pillow(images, params, owner, size, interpolation)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want), f"{(got != want).sum()} of {want.numel()} values differ"


def test_every_jitter_order_and_the_identity_are_exact():
    arr = _images(1, seed=3)[0]
    img = Image.fromarray(arr)
    base = measure_view(sample_view(ViewSettings(), 0, "x", 0, arr.shape[:2]), img)
    orders = [(0, 1, 2, 3), (2, 1, 0, 3), (1, 2, 0, 3), (3, 2, 1, 0), (1, 0, 3, 2)]
    params = [measure_view(replace(base, order=o, contrast_mean=None), img) for o in orders]
    params += [replace(base, brightness=1.0, contrast=1.0, saturation=1.0, contrast_mean=None),  # no jitter
               measure_view(replace(base, saturation=1.6, brightness=0.5, contrast_mean=None), img)]
    want = torch.stack([apply_view(img, p, 96, "bicubic") for p in params])
    assert torch.equal(DeviceViews(96, "bicubic").make([arr], params, [0] * len(params)), want)


def test_stage_2_crops_give_the_same_views():
    """Stage 2's loader workers copy each crop box and shift its record to it; the views are the same."""
    images = _images(6, seed=5)
    _, params, owner = _views(images, ViewSettings(), k=2)
    views = DeviceViews(64, "bicubic")
    ints, floats = _records(params)
    pairs = [crop_record(Image.fromarray(images[i]), r.numpy()) for i, r in zip(owner, ints, strict=True)]
    crops, shifted = [c for c, _ in pairs], [r for _, r in pairs]
    got = views.render(PackedImages.pack(crops), list(range(len(crops))), np.stack(shifted), floats)
    assert torch.equal(got, views.render(PackedImages.pack(images), owner, ints, floats))


KERNEL_CHECK = """
import numpy as np, torch
from targets.device_views import DeviceViews, PackedImages, use_kernels
from tests.test_device_views import _images, _pillow, _records, _views
from targets.views import ViewSettings
assert use_kernels(torch.device("cpu"))
images = _images(7, seed=11, high=90)  # small: the interpreter runs every program in Python
sampled, params, owner = _views(images, ViewSettings(crop_ratio=(0.3, 3.0)), k=2)
for size, interp in (((20, 28), "bicubic"), (12, "bilinear")):
    views = DeviceViews(size, interp)
    packed = PackedImages.pack(images)
    ints, floats = _records(sampled)
    measured = views.measure(packed, owner, ints, floats)
    assert torch.equal(measured, _records(params)[0]), "contrast means"
    got = views.render(packed, owner, measured, floats)
    want = _pillow(images, params, owner, size, interp)
    assert torch.equal(got, want), f"{(got != want).sum()} of {want.numel()} values differ"
print("kernels exact", len(params), sum(p.flip for p in params))
"""


@pytest.mark.slow
def test_the_triton_kernels_are_exact_under_the_interpreter():
    pytest.importorskip("triton")
    res = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0 and "kernels exact" in res.stdout, res.stderr[-3000:]


def test_what_the_device_path_does_not_reproduce_is_refused():
    with pytest.raises(ValueError, match="--view-path pillow"):
        DeviceViews(64, "lanczos")
    arr = _images(1)[0]
    p = measure_view(sample_view(ViewSettings(hue=0.1), 0, "k", 0, arr.shape[:2]), Image.fromarray(arr))
    with pytest.raises(ValueError, match="hue"):
        DeviceViews(64, "bicubic").make([arr], [p])


def test_stage1_device_path_store_equals_pillow_path_store(tmp_path):
    write_good_images(tmp_path / "images", 9, sizes=((96, 128), (150, 60), (64, 64)))
    write_bad_images(tmp_path / "images")
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=6)
    stores = {}
    for path in ("pillow", "device"):
        out = tmp_path / f"{path}.zarr"
        cfg = ExtractConfig(shards=str(tmp_path / "shards"), out=str(out), views_per_image=3, batch_size=7,
                            workers=1, progress=False, view_path=path,
                            teacher=TeacherSpec(name=TINY_TEACHER, pretrained="none"))
        run_extract(cfg)
        stores[path] = TargetStore.open(out)
    a, b = stores["pillow"], stores["device"]
    assert (a.meta.view_path, b.meta.view_path) == ("pillow", "device") and not a.meta.differences(b.meta)
    assert a.unit_names() == b.unit_names()
    for name in a.unit_names():
        ua, ub = a.unit(name), b.unit(name)
        assert ub.marker["view_path"] == "device"
        assert ua.keys == ub.keys and np.array_equal(ua.valid, ub.valid)
        assert np.array_equal(ua.view_int, ub.view_int) and np.array_equal(ua.view_float, ub.view_float)
        assert np.array_equal(ua.latents[:], ub.latents[:]), name  # same pixels -> the same teacher latents


def test_records_roundtrip_into_the_device_path():
    """Stage 2 reads the stored records; the device path takes them as they are."""
    arr = _images(1, seed=9)[0]
    img = Image.fromarray(arr)
    p = measure_view(sample_view(ViewSettings(), 4, "rec", 2, arr.shape[:2]), img)
    q = ViewParams.from_record(*p.to_record())
    assert torch.equal(DeviceViews(64, "bicubic").make([arr], [q])[0], apply_view(img, p, 64, "bicubic"))
