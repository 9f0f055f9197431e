from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F1
from PIL import Image

from cae2.config import IMAGENET_MEAN, IMAGENET_STD
from targets.views import (
    DecodeError,
    ViewParams,
    ViewSettings,
    apply_view,
    decode_image,
    measure_view,
    normalize,
    sample_view,
)
from tests.fixtures import write_bad_images


def test_params_are_deterministic_per_seed_key_view():
    s = ViewSettings()
    a = sample_view(s, 0, "k1", 0, (300, 400))
    assert a == sample_view(s, 0, "k1", 0, (300, 400))
    others = {sample_view(s, 0, "k1", 1, (300, 400)), sample_view(s, 0, "k2", 0, (300, 400)),
              sample_view(s, 1, "k1", 0, (300, 400))}
    assert a not in others and len(others) == 3


def test_params_follow_the_settings():
    s = ViewSettings()
    params = [sample_view(s, 0, f"key{i}", 0, (300, 400)) for i in range(500)]
    assert all(not p.check((300, 400), s) for p in params)
    areas = np.array([p.height * p.width / (300 * 400) for p in params])
    assert areas.min() >= 0.39 and areas.max() <= 1.0
    assert 0.4 < np.mean([p.flip for p in params]) < 0.6
    assert {p.order for p in params} and len({p.order for p in params}) > 12
    assert min(p.brightness for p in params) < 0.65 and max(p.contrast for p in params) > 1.35
    off = ViewSettings(brightness=0, contrast=0, saturation=0, flip_prob=0)
    p = sample_view(off, 0, "k", 0, (10, 10))
    assert (p.brightness, p.contrast, p.saturation, p.flip) == (1.0, 1.0, 1.0, False)


def test_record_roundtrip_is_exact():
    p = sample_view(ViewSettings(hue=0.1), 3, "abc", 2, (500, 375))
    ints, floats = p.to_record()
    assert ViewParams.from_record(ints, floats) == p and p.contrast_mean is None
    measured = measure_view(p, _pil(500, 375))
    assert measured.contrast_mean is not None
    ints, floats = measured.to_record()
    assert ViewParams.from_record(ints, floats) == measured
    assert ViewParams.from_record(ints[:9], floats) == p  # a schema-1 record: no stored mean


def _pil(h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _official(img, p, size):
    """The official pipeline on PIL images: ColorJitter ops in order on the full image, then
    RandomHorizontalFlip, then RandomResizedCrop (torchvision's PIL functional ops)."""
    fns = {0: lambda x: F1.adjust_brightness(x, p.brightness), 1: lambda x: F1.adjust_contrast(x, p.contrast),
           2: lambda x: F1.adjust_saturation(x, p.saturation),
           3: lambda x: F1.adjust_hue(x, p.hue) if p.hue else x}  # ColorJitter skips hue at strength 0
    for op in p.order:
        img = fns[op](img)
    if p.flip:
        img = F1.hflip(img)
    img = F1.resized_crop(img, p.top, p.left, p.height, p.width, [size, size],
                          interpolation=F1.InterpolationMode.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.mark.parametrize("hue", [0.0, 0.1])
def test_bit_exact_with_the_official_torchvision_pil_pipeline(hue):
    """Jitter on the full image (contrast uses the whole image's mean), then flip, then crop+resize."""
    arr = np.array(_pil(80, 100))
    arr[:, :30] = 250  # a bright strip outside most crops: it moves the contrast mean
    img = Image.fromarray(arr)
    s = ViewSettings(hue=hue)
    fused = 0
    for i in range(40):
        p = sample_view(s, 0, f"x{i}", 0, (80, 100))
        official = _official(img, p, 32)
        assert torch.equal(apply_view(img, p, 32, "bicubic"), official), p
        # as stage 2 does it: the mean measured in stage 1, then only the crop's pixels
        assert torch.equal(apply_view(img, measure_view(p, img), 32, "bicubic"), official), p
        fused += abs(p.order.index(0) - p.order.index(1)) == 1  # brightness and contrast in one table
    assert 5 <= fused <= 35


def test_the_stored_contrast_mean_is_used():
    """Stage 2 does not look outside the crop: the contrast mean comes from the record."""
    arr = np.array(_pil(80, 100))
    arr[:, :30] = 250
    img = Image.fromarray(arr)
    p = measure_view(ViewParams(order=(1, 0, 2, 3), brightness=1.0, contrast=0.6, saturation=1.0, hue=0.0,
                                flip=False, top=0, left=40, height=80, width=60), img)
    assert p.contrast_mean == int(np.array(img.convert("L")).mean() + 0.5)
    other = replace(p, contrast_mean=p.contrast_mean + 20)
    assert not torch.equal(apply_view(img, p, 16, "bilinear"), apply_view(img, other, 16, "bilinear"))
    problems = replace(p, contrast_mean=300).check((80, 100), ViewSettings())
    assert problems == ["contrast mean 300 is outside [0, 255]"]


def test_flip_mirrors_the_box():
    img = _pil(40, 60)
    base = dict(order=(0, 1, 2, 3), brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, top=5, height=20,
                width=30)
    plain = apply_view(img, ViewParams(flip=False, left=0, **base), 16, "bilinear")
    # box at left=30 in the flipped frame is the original's left 0..30 mirrored
    flipped = apply_view(img, ViewParams(flip=True, left=30, **base), 16, "bilinear")
    assert torch.equal(flipped, plain.flip(-1))


def test_normalisation_and_shape():
    img = _pil()
    p = sample_view(ViewSettings(), 0, "k", 0, (90, 120))
    raw = apply_view(img, p, 24, "bicubic")
    assert raw.shape == (3, 24, 24) and raw.dtype == torch.uint8
    norm = normalize(raw, IMAGENET_MEAN, IMAGENET_STD)
    m, s = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert norm.dtype == torch.float32 and torch.allclose(norm, (raw.float() / 255 - m) / s, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        apply_view(_pil(10, 10), p, 24, "bicubic")


def test_decode_awkward_files(tmp_path):
    files = write_bad_images(tmp_path)
    for name, expect in files.items():
        data = (tmp_path / name).read_bytes()
        if expect == "ok":
            img = decode_image(data)
            assert img.mode == "RGB" and img.width >= 1
            p = sample_view(ViewSettings(), 0, name, 0, (img.height, img.width))
            assert apply_view(img, p, 32, "bicubic").shape == (3, 32, 32)
        else:
            with pytest.raises(DecodeError):
                decode_image(data)
