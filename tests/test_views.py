import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from targets.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeError,
    ViewParams,
    ViewSettings,
    apply_view,
    decode_image,
    sample_view,
)
from tests.fixtures import write_bad_images

ZERO = (0.0, 0.0, 0.0)
ONE = (1.0, 1.0, 1.0)


def _image(h=90, w=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)


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
    assert ViewParams.from_record(ints, floats) == p


def test_matches_torchvision_reference_in_the_official_order():
    """Jitter on the full image (contrast uses the whole image's mean), then flip, then crop+resize."""
    img = _image(80, 100)
    img[:, :, :30] = 250  # a bright strip outside the crop: it moves the contrast mean
    s = ViewSettings()
    for i in range(20):
        p = sample_view(s, 0, f"x{i}", 0, (80, 100))
        x = img.float() / 255
        for op in p.order:
            if op == 0:
                x = TF.adjust_brightness(x, p.brightness)
            elif op == 1:
                x = TF.adjust_contrast(x, p.contrast)
            elif op == 2:
                x = TF.adjust_saturation(x, p.saturation)
        if p.flip:
            x = TF.horizontal_flip(x)
        ref = TF.resized_crop(x, p.top, p.left, p.height, p.width, [32, 32],
                              interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        ours = apply_view(img, p, 32, "bicubic", ZERO, ONE)
        assert (ours - ref).abs().max() < 2e-5, p


def test_flip_mirrors_the_box():
    img = _image(40, 60)
    base = dict(order=(0, 1, 2, 3), brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, top=5, height=20,
                width=30)
    plain = apply_view(img, ViewParams(flip=False, left=0, **base), 16, "bilinear", ZERO, ONE)
    # box at left=30 in the flipped frame is the original's left 0..30 mirrored
    flipped = apply_view(img, ViewParams(flip=True, left=30, **base), 16, "bilinear", ZERO, ONE)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6)


def test_normalisation_and_shape():
    img = _image()
    p = sample_view(ViewSettings(), 0, "k", 0, (90, 120))
    raw = apply_view(img, p, 24, "bicubic", ZERO, ONE)
    norm = apply_view(img, p, 24, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    assert norm.shape == (3, 24, 24) and norm.dtype == torch.float32
    m, s = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(norm, (raw - m) / s, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        apply_view(_image(10, 10), p, 24, "bicubic", ZERO, ONE)


def test_decode_awkward_files(tmp_path):
    files = write_bad_images(tmp_path)
    for name, expect in files.items():
        data = (tmp_path / name).read_bytes()
        if expect == "ok":
            img = decode_image(data)
            assert img.dtype == torch.uint8 and img.shape[0] == 3
            p = sample_view(ViewSettings(), 0, name, 0, tuple(img.shape[1:]))
            assert apply_view(img, p, 32, "bicubic", IMAGENET_MEAN, IMAGENET_STD).isfinite().all()
        else:
            with pytest.raises(DecodeError):
                decode_image(data)
