"""Augmented views: one definition that both stages use.

A view is the official CAE v2 augmentation with every random choice made explicit:
colour jitter on the full image (factors and their order, as torchvision's ColorJitter), then a
horizontal flip, then a RandomResizedCrop box in integer pixels of the flipped frame, resized to
the model's input size. Parameters come from a counter-based generator keyed by
(seed, image key, view index), so any view can be regenerated and checked, and `apply_view`
re-applies stored parameters exactly.

Pixel values follow the official pipeline exactly: torchvision's colour ops on PIL images (uint8
after each op), a PIL crop and flip, and a PIL antialiased resize. Per-pixel ops commute with
cropping, so they run on the crop only. Contrast blends towards the grayscale mean of the whole
image after the ops before it; stage 1 measures that mean once (`measure_view`) and stores it with
the view, so stage 2 touches only the crop's pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

import numpy as np
import torch
import torchvision.transforms.functional as TF1
from PIL import Image, ImageStat, UnidentifiedImageError

from cae2.errors import UserError
from cae2.fields import Range, check_fields

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter op ids, as in torchvision's ColorJitter order


@dataclass(frozen=True, kw_only=True)
class ViewSettings:
    """Augmentation strengths: their one home (defaults: Table 7 and the official pipeline, for every preset)."""

    brightness: Annotated[float, Range(0, 1, open_max=True)] = 0.4
    """Brightness jitter: factors in [1 - b, 1 + b]."""
    contrast: Annotated[float, Range(0, 1, open_max=True)] = 0.4
    """Contrast jitter: factors in [1 - c, 1 + c]."""
    saturation: Annotated[float, Range(0, 1, open_max=True)] = 0.4
    """Saturation jitter: factors in [1 - s, 1 + s]."""
    hue: Annotated[float, Range(0, 0.5)] = 0.0
    """Hue jitter (0 in CAE v2; the device view path has none)."""
    flip_prob: Annotated[float, Range(0, 1)] = 0.5
    """Probability of a horizontal flip."""
    crop_scale: tuple[float, float] = (0.4, 1.0)
    """RandomResizedCrop area fractions (min max)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect ratios (min max)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise UserError(f"--crop-scale must satisfy 0 < min <= max <= 1, not {list(self.crop_scale)}")
        if not (0 < self.crop_ratio[0] <= self.crop_ratio[1]) or not all(map(math.isfinite, self.crop_ratio)):
            raise UserError(f"--crop-ratio must satisfy 0 < min <= max, not {list(self.crop_ratio)}")

    @classmethod
    def from_jitter(cls, color_jitter: float, **kw) -> ViewSettings:
        return cls(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, **kw)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ViewSettings:
        fields: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)


@dataclass(frozen=True, kw_only=True)
class ViewParams:
    """Every random choice of one view. Float factors are float32-exact (as stored)."""

    order: tuple[int, int, int, int]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    flip: bool
    top: int
    left: int
    height: int
    width: int
    """Crop box in integer pixels of the flipped frame."""
    contrast_mean: int | None = None
    """Pillow's contrast mean: the grayscale mean of the whole image after the jitter ops before
    contrast. A property of the image, so `sample_view` leaves it None and `measure_view` fills it in;
    None makes `apply_view` compute it from the whole image."""

    def to_record(self) -> tuple[np.ndarray, np.ndarray]:
        mean = -1 if self.contrast_mean is None else self.contrast_mean
        ints = np.array([*self.order, int(self.flip), self.top, self.left, self.height, self.width, mean],
                        dtype=np.int32)
        floats = np.array([self.brightness, self.contrast, self.saturation, self.hue], dtype=np.float32)
        return ints, floats

    @classmethod
    def from_record(cls, ints: np.ndarray, floats: np.ndarray) -> ViewParams:
        """Inverse of `to_record`; also reads 9-int records (written before the contrast mean was stored)."""
        i = [int(v) for v in ints]
        f = [float(v) for v in np.asarray(floats, dtype=np.float32)]
        mean = i[9] if len(i) > 9 and i[9] >= 0 else None
        return cls(order=(i[0], i[1], i[2], i[3]), flip=bool(i[4]), top=i[5], left=i[6], height=i[7], width=i[8],
                   brightness=f[0], contrast=f[1], saturation=f[2], hue=f[3], contrast_mean=mean)

    def check(self, image_hw: tuple[int, int], settings: ViewSettings) -> list[str]:
        """Problems with these parameters for an image of this size (empty list: valid)."""
        H, W = image_hw
        problems = []
        if sorted(self.order) != [0, 1, 2, 3]:
            problems.append(f"jitter order {self.order} is not a permutation of 0..3")
        if not (self.top >= 0 and self.left >= 0 and self.height > 0 and self.width > 0
                and self.top + self.height <= H and self.left + self.width <= W):
            problems.append(f"crop box (top={self.top}, left={self.left}, h={self.height}, w={self.width}) "
                            f"is outside the {H}x{W} image")
        for name in ("brightness", "contrast", "saturation"):
            s, v = getattr(settings, name), getattr(self, name)
            if not (max(0.0, 1 - s) - 1e-6 <= v <= 1 + s + 1e-6):
                problems.append(f"{name} factor {v} is outside [{max(0.0, 1 - s)}, {1 + s}]")
        if abs(self.hue) > settings.hue + 1e-6:
            problems.append(f"hue factor {self.hue} is outside [-{settings.hue}, {settings.hue}]")
        if self.contrast_mean is not None and not 0 <= self.contrast_mean <= 255:
            problems.append(f"contrast mean {self.contrast_mean} is outside [0, 255]")
        return problems


VIEW_PARAMS_SALT = "cae2-view"  # changing it changes the views of every store (tests/test_golden.py)


def view_rng(seed: int, key: str, index: int) -> np.random.Generator:
    """Counter-based (Philox) generator for one (seed, image key, view index)."""
    digest = hashlib.sha256(f"{VIEW_PARAMS_SALT}\0{seed}\0{key}\0{index}".encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def _f32(x: float) -> float:
    return float(np.float32(x))


def random_resized_crop(rng: np.random.Generator, H: int, W: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with an explicit generator -> (top, left, h, w)."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    in_ratio = W / H  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    h, w = max(1, min(h, H)), max(1, min(w, W))
    return (H - h) // 2, (W - w) // 2, h, w


def sample_view(settings: ViewSettings, seed: int, key: str, index: int, image_hw: tuple[int, int]) -> ViewParams:
    """Parameters of view `index` of image `key` (size H x W), in the official order:
    jitter factors and order -> flip -> crop box in the flipped frame."""
    rng = view_rng(seed, key, index)
    o = [int(i) for i in rng.permutation(4)]
    order = (o[0], o[1], o[2], o[3])

    def factor(strength: float) -> float:
        return _f32(rng.uniform(max(0.0, 1 - strength), 1 + strength)) if strength > 0 else 1.0

    b, c, s = factor(settings.brightness), factor(settings.contrast), factor(settings.saturation)
    hue = _f32(rng.uniform(-settings.hue, settings.hue)) if settings.hue > 0 else 0.0
    flip = bool(rng.uniform() < settings.flip_prob)
    top, left, h, w = random_resized_crop(rng, *image_hw, settings.crop_scale, settings.crop_ratio)
    return ViewParams(order=order, brightness=b, contrast=c, saturation=s, hue=hue, flip=flip,
                      top=top, left=left, height=h, width=w)


class DecodeError(ValueError):
    """A sample that is not a usable image; the message is the reason recorded in the store."""


def decode_image(data: bytes) -> Image.Image:
    """Image bytes (JPEG incl. CMYK/grayscale, PNG, anything Pillow reads) -> a loaded RGB PIL image.

    16-bit images are scaled to 8 bits (round(v * 255 / 65535)); palette, alpha and CMYK images convert as
    Pillow converts them; float and 32-bit integer images, whose range no format fixes, are refused. EXIF
    orientation is not applied: pixels are used as stored, as torchvision's and timm's loaders and the
    GPU's JPEG decoder use them, in every stage alike."""
    if not data:
        raise DecodeError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeError(f"undecodable image: {type(e).__name__}: {_plain(e)}") from None
    if img.width < 1 or img.height < 1:
        raise DecodeError("image has no pixels")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        if img.mode == "I" and (wide.min(initial=0) < 0 or wide.max(initial=0) > 65535):
            raise DecodeError(f"{img.mode} image with values outside 0..65535 (32-bit integers): convert it to "
                              "8 or 16 bits")
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "F":
        raise DecodeError("floating-point image (mode F) has no fixed range: convert it to 8 or 16 bits")
    return img.convert("RGB")


def image_problem(data: bytes) -> str | None:
    """Why bytes are not an image, from the header only (no decode); None if Pillow can open them."""
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            return "image has no pixels" if img.width < 1 or img.height < 1 else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"not an image: {type(e).__name__}: {_plain(e)}"


def _plain(error: BaseException) -> str:
    """An error's message on one line, without object addresses (the same reason reads the same every time)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(error).split()))


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
_LEVELS = np.arange(256, dtype=np.float32)


def _blend_table(constant: float, factor: float) -> np.ndarray:
    """Pillow's Image.blend(constant image, x, factor) for every uint8 value x (one channel).

    Same float32 arithmetic and truncation as Pillow's C blend, so applying it is bit-identical to
    ImageEnhance.Brightness (constant 0) and ImageEnhance.Contrast (constant = mean) but faster.
    """
    c, a = np.float32(constant), np.float32(factor)
    return np.trunc(c + a * (_LEVELS - c)).clip(0, 255).astype(np.uint8)


def jitter_table(op: int, p: ViewParams, contrast_mean: int) -> np.ndarray | None:
    """The per-channel lookup table of a brightness or contrast op; None for the other ops."""
    if op == BRIGHTNESS:
        return _blend_table(0, p.brightness)
    if op == CONTRAST:
        return _blend_table(contrast_mean, p.contrast)
    return None


def op_enabled(op: int, p: ViewParams) -> bool:
    """Whether the op changes pixels (torchvision's ColorJitter skips hue at 0; a factor of 1 is identity)."""
    return p.hue != 0.0 if op == HUE else (p.brightness, p.contrast, p.saturation)[op] != 1.0


def _jitter(x: Image.Image, p: ViewParams, contrast_mean: int, ops: tuple[int, ...]) -> Image.Image:
    """torchvision's PIL colour ops (ImageEnhance) in order. Brightness and contrast are per-channel
    lookup tables: adjacent ones are composed into a single table (exact: each op maps uint8 to uint8)."""
    table = None
    for op in (o for o in ops if op_enabled(o, p)):
        t = jitter_table(op, p, contrast_mean)
        if t is not None:
            table = t if table is None else t[table]
            continue
        if table is not None:
            x, table = x.point(table.tolist() * 3), None
        adjust: Any = TF1.adjust_saturation if op == SATURATION else TF1.adjust_hue  # torchvision's PIL path
        x = adjust(x, p.saturation if op == SATURATION else p.hue)
    return x if table is None else x.point(table.tolist() * 3)


def measure_view(p: ViewParams, image: Image.Image) -> ViewParams:
    """`p` with the image-wide statistic it needs (the contrast mean) measured on `image`."""
    if not op_enabled(CONTRAST, p):
        return p
    before = _jitter(image, p, 0, p.order[: p.order.index(CONTRAST)])
    return replace(p, contrast_mean=int(ImageStat.Stat(before.convert("L")).mean[0] + 0.5))


def apply_view(image: Image.Image, p: ViewParams, size: int | tuple[int, int], interpolation: str) -> torch.Tensor:
    """Re-apply a view: RGB image -> uint8 [3, size, size] (normalise with `normalize`).

    Bit-exact with the official torchvision-on-PIL pipeline (ColorJitter -> RandomHorizontalFlip ->
    RandomResizedCrop) given the same parameters, but the per-pixel ops run on the crop only.
    interpolation: 'bicubic' (both views of CAE v2), 'bilinear', ...
    """
    W, H = image.size
    if not (p.top + p.height <= H and p.left + p.width <= W):
        raise ValueError(f"view box {p} does not fit a {H}x{W} image")
    if p.contrast_mean is None:
        p = measure_view(p, image)
    # The box is in the flipped frame; in the original frame its columns are mirrored.
    left = W - p.left - p.width if p.flip else p.left
    x = image.crop((left, p.top, left + p.width, p.top + p.height))
    if p.flip:
        x = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = _jitter(x, p, p.contrast_mean or 0, p.order)
    out_wh = (size, size) if isinstance(size, int) else (size[1], size[0])
    x = x.resize(out_wh, _RESAMPLE[interpolation])
    return torch.from_numpy(np.array(x)).permute(2, 0, 1)  # [3, S, S] uint8 (a view of an owned copy)


def render_view(image: Image.Image, ints: np.ndarray, floats: np.ndarray, size: int | tuple[int, int],
                interpolation: str) -> torch.Tensor:
    """A stored view (its `view_int` and `view_float` records) re-applied to the decoded image: how stage 2's
    Pillow path renders every sample, and what `cae2 inspect --report` shows."""
    return apply_view(image, ViewParams.from_record(ints, floats), size, interpolation)


def normalize(images: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, on the images' device."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.float().div_(255) - m).div_(s)
