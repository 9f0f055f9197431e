"""The device view path (targets.device_views) on CPU tensors: bit-exact with the Pillow path."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.demo import synthetic_image
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.shards import make_shards
from targets.cache import TargetStore
from targets.device_views import (
    DeviceViews,
    crop_box,
    group_inputs,
    pad_crops,
    plan_groups,
    vertical_first,
)
from targets.teacher import TeacherSpec
from targets.views import ViewParams, ViewSettings, apply_view, measure_view, sample_view
from tests.fixtures import TINY_TEACHER, write_bad_images, write_good_images


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Noise and smooth images, tall, wide, tiny and larger than the output (up- and downscaling)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(8, 420, 2))
        if i % 3 == 0:
            out.append((rng.random((h, w, 3)) * 255).astype(np.uint8))
        else:
            out.append(synthetic_image(rng, h, w))
    return out


def _views(images, settings: ViewSettings, k: int = 3, seed: int = 0):
    crops, params, ref_images = [], [], []
    for i, arr in enumerate(images):
        img = Image.fromarray(arr)
        for v in range(k):
            p = measure_view(sample_view(settings, seed, f"img{i}", v, arr.shape[:2]), img)
            params.append(p)
            crops.append(torch.from_numpy(np.ascontiguousarray(crop_box(arr, p))))
            ref_images.append(img)
    return crops, params, ref_images


@pytest.mark.parametrize(("size", "interpolation"), [(224, "bicubic"), (64, "bicubic"), ((48, 80), "bilinear")])
def test_views_are_bit_identical_to_the_pillow_path(size, interpolation):
    images = _images(18)
    crops, params, ref_images = _views(images, ViewSettings(crop_ratio=(0.3, 3.0)))  # tall and wide boxes too
    assert any(p.flip for p in params) and len({p.order for p in params}) > 8
    out_hw = (size, size) if isinstance(size, int) else size
    assert {vertical_first((p.height, p.width), out_hw) for p in params} == {False, True}  # both pass orders
    got = DeviceViews(size, interpolation, group_elements=1 << 20).make(crops, params)  # several groups
    want = torch.stack([apply_view(img, p, size, interpolation) for img, p in zip(ref_images, params, strict=True)])
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
    crops = [torch.from_numpy(np.ascontiguousarray(crop_box(arr, p))) for p in params]
    want = torch.stack([apply_view(img, p, 96, "bicubic") for p in params])
    assert torch.equal(DeviceViews(96, "bicubic").make(crops, params), want)


def test_host_padded_groups_equal_device_padding():
    """Stage 2's loader workers pad the crops of a batch on the host; the result is the same."""
    crops, params, _ = _views(_images(9, seed=5), ViewSettings(), k=2)
    views = DeviceViews(64, "bicubic", group_elements=1 << 19)
    host_crops = [c.numpy() for c in crops]
    groups = []
    for plan in plan_groups([(p.height, p.width) for p in params], views.out_hw, views.group_elements):
        groups.append({**group_inputs(params, plan, views.out_hw, "bicubic"), "pixels": pad_crops(host_crops, plan)})
    assert len(groups) > 2
    assert torch.equal(views.make_batch(groups, len(params)), views.make(crops, params))


def test_what_the_device_path_does_not_reproduce_is_refused():
    with pytest.raises(ValueError, match="--view-path pillow"):
        DeviceViews(64, "lanczos")
    arr = _images(1)[0]
    p = measure_view(sample_view(ViewSettings(hue=0.1), 0, "k", 0, arr.shape[:2]), Image.fromarray(arr))
    with pytest.raises(ValueError, match="hue"):
        DeviceViews(64, "bicubic").make([torch.from_numpy(np.ascontiguousarray(crop_box(arr, p)))], [p])
    q = sample_view(ViewSettings(), 0, "k", 1, arr.shape[:2])  # contrast mean not measured
    with pytest.raises(ValueError, match="contrast mean"):
        DeviceViews(64, "bicubic").make([torch.from_numpy(np.ascontiguousarray(crop_box(arr, q)))], [q])


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
        run_extract(cfg, log=lambda m: None)
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
    """Stage 2 rebuilds parameters from the stored records; the device path takes them as they are."""
    arr = _images(1, seed=9)[0]
    img = Image.fromarray(arr)
    p = measure_view(sample_view(ViewSettings(), 4, "rec", 2, arr.shape[:2]), img)
    q = ViewParams.from_record(*p.to_record())
    crop = torch.from_numpy(np.ascontiguousarray(crop_box(arr, q)))
    assert torch.equal(DeviceViews(64, "bicubic").make([crop], [q])[0], apply_view(img, p, 64, "bicubic"))
