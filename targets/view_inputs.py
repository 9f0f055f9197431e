"""What the device view path needs besides the pixels, computed on the device from the stored view
records, vectorised over a batch: no per-view Python on the host.

- `programs`: each view's colour jitter as Pillow applies it: a lookup table before saturation, the
  saturation factor, a table after it (brightness and contrast are float32 blend tables, composed);
- `coefficients`: Pillow's fixed-point resampling of each view's axis (precompute_coeffs and
  normalize_coeffs_8bpc of libImaging/Resample.c), the same double operations in the same order, the
  weights' sum accumulated tap by tap as Pillow's loop does;
- `vertical_first`: Pillow's choice of which pass runs first.

Every float op here is a separate torch op (never fused), so each rounds as Pillow's C code does.
Records are `targets.views.ViewParams.to_record`'s: ints [n, 10] (jitter order (4), flip, top, left,
height, width, contrast mean or -1) and floats [n, 4] (brightness, contrast, saturation, hue).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from targets.views import BRIGHTNESS, CONTRAST, HUE, SATURATION

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2
SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # Pillow's filter support
ORDER, FLIP, TOP, LEFT, HEIGHT, WIDTH, MEAN = slice(0, 4), 4, 5, 6, 7, 8, 9


@dataclass
class Programs:
    """Per view: table `pre` [n, 256] uint8, then saturation [n] float32 (1.0: none), then table `post`."""

    pre: torch.Tensor
    saturation: torch.Tensor
    post: torch.Tensor


def blend_tables(constant: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.blend(constant, x, factor) of every uint8 x, per view: [n] float32 -> [n, 256] uint8
    (its C loop in float32: constant + factor * (x - constant), truncated)."""
    levels = torch.arange(256, dtype=torch.float32, device=factor.device)
    c, a = constant.to(torch.float32)[:, None], factor.to(torch.float32)[:, None]
    diff = levels[None] - c
    scaled = a * diff
    return (c + scaled).trunc().clamp(0, 255).to(torch.uint8)


def programs(ints: torch.Tensor, floats: torch.Tensor, before_contrast: bool = False) -> Programs:
    """The jitter of each view (`before_contrast`: only the ops before contrast, with which stage 1
    measures the contrast mean). Hue is refused by `BatchPlan`."""
    n, device = len(ints), ints.device
    order = ints[:, ORDER].long()
    b, c, s, _ = floats.to(torch.float32).unbind(1)
    identity = torch.arange(256, dtype=torch.uint8, device=device).expand(n, 256)
    tables = {BRIGHTNESS: blend_tables(torch.zeros(n, device=device), b),
              CONTRAST: blend_tables(ints[:, MEAN].clamp(min=0).to(torch.float32), c)}
    enabled = {BRIGHTNESS: b != 1.0, CONTRAST: c != 1.0, SATURATION: s != 1.0}
    pre, post = identity.clone(), identity.clone()
    saturated = torch.zeros(n, dtype=torch.bool, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)  # before_contrast: the contrast op has been reached
    for i in range(4):
        op = order[:, i]
        if before_contrast:
            done = done | (op == CONTRAST)
        for kind, table in tables.items():
            on = (op == kind) & enabled[kind] & ~done
            composed = torch.gather(table, 1, pre.long()), torch.gather(table, 1, post.long())
            pre = torch.where((on & ~saturated)[:, None], composed[0], pre)
            post = torch.where((on & saturated)[:, None], composed[1], post)
        saturated = saturated | ((op == SATURATION) & enabled[SATURATION] & ~done)
    return Programs(pre, torch.where(saturated, s, torch.ones_like(s)), post)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5
    x = x.abs()
    near = (((a + 2.0) * x) - (a + 3.0)) * x * x + 1
    far = ((((x - 5) * x) + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


FILTERS = {"bicubic": _bicubic, "bilinear": _bilinear}


@dataclass
class Coefficients:
    """One axis of n views: first input index [n, out] int64, fixed-point weights [n, out, k] int32 (zero
    past each output's taps), taps [n, out] int64."""

    first: torch.Tensor
    weights: torch.Tensor
    taps: torch.Tensor


def max_taps(in_sizes: np.ndarray, out_size: int, interpolation: str) -> int:
    """The widest filter of these axes (Pillow's ksize), from sizes the host knows."""
    if not len(in_sizes):
        return 1
    support = SUPPORT[interpolation] * np.maximum(np.asarray(in_sizes, np.float64) / out_size, 1.0)
    return int(np.ceil(support).max()) * 2 + 1


def coefficients(in_sizes: torch.Tensor, out_size: int, interpolation: str, k: int | None = None) -> Coefficients:
    """Pillow's resampling coefficients of each view's axis, in_sizes [n] -> out_size; `k` (>= the widest
    filter, `max_taps`) from the host, so that nothing waits for the device."""
    device = in_sizes.device
    size = in_sizes.to(torch.float64)[:, None]
    scale = size / out_size  # [n, 1]
    filterscale = torch.clamp(scale, min=1.0)
    support = SUPPORT[interpolation] * filterscale
    k = k or max_taps(in_sizes.cpu().numpy(), out_size, interpolation)
    ss = 1.0 / filterscale
    center = (torch.arange(out_size, dtype=torch.float64, device=device)[None] + 0.5) * scale  # [n, out]
    first = torch.clamp((center - support + 0.5).trunc(), min=0)
    last = torch.minimum((center + support + 0.5).trunc(), size)
    taps = (last - first).long()
    x = torch.arange(k, device=device)
    args = (((x[None, None] + first[..., None].long()).to(torch.float64) - center[..., None]) + 0.5) * ss[..., None]
    used = x[None, None] < taps[..., None]
    w = torch.where(used, FILTERS[interpolation](args), torch.zeros_like(args))
    total = torch.zeros_like(center)
    for j in range(k):  # left to right, as Pillow's loop sums them
        total = total + w[..., j]
    w = torch.where(total[..., None] != 0.0, w / torch.where(total != 0.0, total, 1.0)[..., None], w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = torch.where(w < 0, (-0.5 + scaled).trunc(), (0.5 + scaled).trunc())
    return Coefficients(first.long(), torch.where(used, fixed, 0.0).to(torch.int32), taps)


def dense(c: Coefficients, in_size: int) -> torch.Tensor:
    """The coefficients of one view as a dense [out, in_size] int64 matrix."""
    out, k = c.weights.shape[1:]
    cols = (c.first[0, :, None] + torch.arange(k, device=c.first.device)).clamp(max=in_size - 1)
    m = torch.zeros((out, in_size), dtype=torch.int64, device=c.first.device)
    return m.scatter_add_(1, cols, c.weights[0].long())


@functools.cache
def _pillow_runs_vertical_first() -> bool:
    """Pillow >= 13 runs the vertical pass first when the height shrinks more than twice as much as the
    width; earlier versions always start with the horizontal one. Asked of the installed Pillow."""
    h, w, out = 40, 4, 16
    x = torch.from_numpy((np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3) * 7919 % 251).astype(np.uint8))
    got = torch.from_numpy(np.array(Image.fromarray(x.numpy()).resize((out, out), Image.Resampling.BICUBIC)))
    mh = dense(coefficients(torch.tensor([w]), out, "bicubic"), w)
    mv = dense(coefficients(torch.tensor([h]), out, "bicubic"), h)

    def rnd(v):
        return torch.clamp((v + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255)

    x = x.long()
    h_first = rnd(torch.einsum("ph,hoc->poc", mv, rnd(torch.einsum("hwc,ow->hoc", x, mh))))
    v_first = rnd(torch.einsum("pwc,ow->poc", rnd(torch.einsum("hwc,ph->pwc", x, mv)), mh))
    if (got == v_first).all() and not (got == h_first).all():
        return True
    if (got == h_first).all():
        return False
    raise RuntimeError("the installed Pillow resamples differently from what the device view path reproduces")


def vertical_first(heights, widths, out_hw: tuple[int, int]):
    """Whether Pillow resizes each view with the vertical pass first ([n] bool; numpy or torch)."""
    dh, dw = heights - out_hw[0], widths - out_hw[1]
    return (dh > 0) & (dh > dw * 2) & _pillow_runs_vertical_first()


@dataclass
class BatchPlan:
    """What the host knows of a batch from its records (numpy, vectorised): the launch sizes, the pass
    order and the intermediate's layout, so that nothing on the device path waits for the device."""

    k_horizontal: int
    k_vertical: int
    vertical_first: np.ndarray
    """[n] bool."""
    mid_len: np.ndarray
    """[n] int64: bytes of each view's intermediate (the first pass's output)."""
    pixels: np.ndarray
    """[n] int64: pixels of each view's image."""
    saturation: bool
    """Any view with saturation jitter."""

    @classmethod
    def of(cls, image_hw: np.ndarray, owner: np.ndarray, ints: np.ndarray, floats: np.ndarray,
           out_hw: tuple[int, int], interpolation: str) -> BatchPlan:
        """image_hw [m, 2] of the packed images; owner [n]; the views' records."""
        ints, floats = np.asarray(ints), np.asarray(floats)
        if ((ints[:, ORDER] == HUE).any(1) & (floats[:, 3] != 0)).any():
            raise ValueError("the device view path has no hue jitter; use the Pillow view path (--view-path pillow)")
        h, w = ints[:, HEIGHT].astype(np.int64), ints[:, WIDTH].astype(np.int64)
        first = vertical_first(h, w, out_hw)
        oh, ow = out_hw
        return cls(max_taps(w, ow, interpolation), max_taps(h, oh, interpolation), first,
                   np.where(first, oh * w, h * ow) * 3, image_hw[np.asarray(owner)].prod(1),
                   bool((floats[:, 2] != 1.0).any()))
