"""Views on the accelerator: `targets.views.apply_view` as batched torch ops, bit-exact with it.

The host only decodes (Pillow, libjpeg-turbo) and measures the contrast mean (stage 1); jitter, flip,
crop and the antialiased resize run batched on the views' device (a GPU, or CPU tensors in tests) and
reproduce Pillow's integer arithmetic, so both paths give the same uint8 pixels from the same image:

- brightness / contrast: Pillow's float32 blend as per-channel 256-entry tables (composed, as the
  Pillow path does: each maps uint8 to uint8);
- saturation: Pillow's RGB -> L, (19595 R + 38470 G + 7471 B + 2^15) >> 16, then its float32 blend,
  one rounding per unfused op as in Pillow's C loop (these ops are never compiled or fused);
- crop: slicing; flip: the horizontal resampling matrix with its columns reversed;
- resize: Pillow's separable two-pass resampling with its 22-bit fixed-point coefficients and its
  choice of which pass runs first (`vertical_first`), each pass a batched float64 matrix product.
  All of its terms are integers below 2^53, so the products are exact in any summation order;
  Pillow's rounding and clipping to uint8 follow each pass.

Views of similar size are padded into groups (`plan_groups`, bounded in pixels) so that each op runs
once per group; the host prepares a group's small inputs (`group_inputs`: jitter tables, compact
resampling weights), the device renders it (`render_group`). Hue jitter (0 in CAE v2) and filters
other than bicubic and bilinear are refused: they stay on the Pillow path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from targets.views import CONTRAST, HUE, SATURATION, ViewParams, jitter_table, op_enabled

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2
_IDENTITY = np.arange(256, dtype=np.uint8)
DECODERS = ("pillow",)  # decoders whose pixels the view paths are defined on


_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # Pillow's filter support


def check_supported(interpolation: str, hue: float = 0.0) -> None:
    """Raise ValueError for what the device path does not reproduce."""
    if interpolation not in _SUPPORT:
        raise ValueError(f"the device view path resamples with {' or '.join(_SUPPORT)}, not {interpolation!r}; "
                         "use the Pillow view path (--view-path pillow)")
    if hue:
        raise ValueError(f"the device view path has no hue jitter (settings hue = {hue}); "
                         "use the Pillow view path (--view-path pillow)")


def _bicubic_array(x: np.ndarray) -> np.ndarray:
    """`_bicubic` of every element, with the same double operations."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear_array(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTER_ARRAYS = {"bicubic": _bicubic_array, "bilinear": _bilinear_array}


@functools.lru_cache(maxsize=8192)
def pillow_coefficients(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling of one axis, in_size -> out_size, as (first input index [out] int64,
    fixed-point weights [out, ksize] int64): precompute_coeffs + normalize_coeffs_8bpc of
    libImaging/Resample.c, with the same double operations in the same order (the weights' sum is
    accumulated left to right, as in its loop)."""
    support = _SUPPORT[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C casts truncate towards zero
    taps = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    x = np.arange(ksize)
    k = _FILTER_ARRAYS[interpolation](((x[None] + first[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
    k = np.where(x[None] < taps[:, None], k, 0.0)
    ww = np.add.accumulate(k, axis=1)[:, -1]  # sequential, as Pillow's loop (+0.0 for unused taps)
    k = np.divide(k, ww[:, None], out=k.copy(), where=ww[:, None] != 0.0)
    scaled = k * (1 << PRECISION_BITS)
    weights = np.where(k < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return first, np.where(x[None] < taps[:, None], weights, 0)


def resampling_matrix(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """Dense [out_size, in_size] fixed-point weights."""
    first, weights = pillow_coefficients(in_size, out_size, interpolation)
    m = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        n = min(weights.shape[1], in_size - first[xx])
        m[xx, first[xx]:first[xx] + n] = weights[xx, :n]
    return m


def _pillow_picks_vertical_first() -> bool:
    """Pillow >= 13 runs the vertical pass first when the height shrinks more than twice as much as the
    width; earlier versions always start with the horizontal one. Asked of the installed Pillow."""
    h, w, out = 40, 4, 16
    x = (np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3) * 7919 % 251).astype(np.uint8)
    got = np.asarray(Image.fromarray(x).resize((out, out), Image.Resampling.BICUBIC)).astype(np.int64)
    mh, mv = resampling_matrix(w, out, "bicubic"), resampling_matrix(h, out, "bicubic")

    def rnd(v):
        return np.clip((v + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255)

    h_first = rnd(np.einsum("ph,hoc->poc", mv, rnd(np.einsum("hwc,ow->hoc", x, mh))))
    v_first = rnd(np.einsum("pwc,ow->poc", rnd(np.einsum("hwc,ph->pwc", x, mv)), mh))
    if (got == v_first).all() and not (got == h_first).all():
        return True
    if (got == h_first).all():
        return False
    raise RuntimeError("the installed Pillow resamples differently from what the device view path reproduces")


@functools.cache
def _vertical_first_rule() -> bool:
    return _pillow_picks_vertical_first()


def vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether Pillow resizes in_hw -> out_hw with the vertical pass first (ImagingResampleInner)."""
    dh, dw = in_hw[0] - out_hw[0], in_hw[1] - out_hw[1]
    return _vertical_first_rule() and dh > 0 and dh > dw * 2


@dataclass(frozen=True)
class _Program:
    """A view's colour jitter with hue off: table `pre`, then saturation (1.0: none), then table `post`."""

    pre: np.ndarray
    saturation: float
    post: np.ndarray


def _program(p: ViewParams, ops: Sequence[int], contrast_mean: int) -> _Program:
    pre, post, sat = _IDENTITY, _IDENTITY, 1.0
    for op in ops:
        if not op_enabled(op, p):
            continue
        if op == HUE:
            raise ValueError(f"the device view path has no hue jitter (view hue factor {p.hue}); "
                             "use the Pillow view path (--view-path pillow)")
        if op == SATURATION:
            sat = p.saturation
            continue
        table = jitter_table(op, p, contrast_mean)
        if sat == 1.0:
            pre = table[pre]
        else:
            post = table[post]
    return _Program(pre, sat, post)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L of uint8 [..., 3] -> int32 [...]."""
    x = x.to(torch.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 32768) >> 16


def _run_programs(x: torch.Tensor, pre: torch.Tensor | None, saturation: torch.Tensor | None,
                  post: torch.Tensor | None) -> torch.Tensor:
    """Per-view jitter of uint8 [n, H, W, 3]: tables pre/post uint8 [n, 256] (None: identity for all),
    saturation float32 [n] (None: 1.0 for all)."""
    n = x.shape[0]

    def lookup(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(n, device=x.device, dtype=torch.int32).mul_(256).view(n, 1, 1, 1)
        return tables.reshape(-1)[x.to(torch.int32).add_(offsets)]

    if pre is not None:
        x = lookup(x, pre)
    if saturation is not None:
        gray = _gray(x).unsqueeze(-1)
        alpha = saturation.view(n, 1, 1, 1)
        # Pillow's blend: (float)gray + alpha * (float)(x - gray), rounded to float32 after each op, truncated
        blended = (x.to(torch.int32) - gray).to(torch.float32).mul_(alpha).add_(gray.to(torch.float32))
        x = blended.trunc_().clamp_(0, 255).to(torch.uint8)
    if post is not None:
        x = lookup(x, post)
    return x


def _fixed_point_round(x: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 of an exact fixed-point sum: (sum + 2^21) >> 22, clipped to [0, 255] (as float64)."""
    return x.add_(1 << (PRECISION_BITS - 1)).div_(1 << PRECISION_BITS).floor_().clamp_(0, 255)


@dataclass(frozen=True)
class GroupPlan:
    """Views rendered together: their rows in the batch, padded crop size and pass order."""

    index: list[int]
    hp: int
    wp: int
    vertical_first: bool


def plan_groups(shapes: Sequence[tuple[int, int]], out_hw: tuple[int, int], budget: int = 1 << 26) -> list[GroupPlan]:
    """Views of one pass order, by size, each group's padded pixels (n x hp x wp x 3) within `budget`."""
    plans = []
    for v_first in (False, True):
        subset = [i for i, hw in enumerate(shapes) if vertical_first(hw, out_hw) == v_first]
        subset.sort(key=lambda i: shapes[i][0] * shapes[i][1], reverse=True)
        current, hp, wp = [], 0, 0
        for i in subset:
            h, w = shapes[i]
            nh, nw = max(hp, h), max(wp, w)
            if current and (len(current) + 1) * nh * nw * 3 > budget:
                plans.append(GroupPlan(current, hp, wp, v_first))
                current, nh, nw = [], h, w
            current.append(i)
            hp, wp = nh, nw
        if current:
            plans.append(GroupPlan(current, hp, wp, v_first))
    return plans


def _axis_weights(sizes: Sequence[int], out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Compact resampling weights of n axes: (first input index [n, out] int64, weights [n, out, k] int32)."""
    coeffs = [pillow_coefficients(int(s), out_size, interpolation) for s in sizes]
    k = max(w.shape[1] for _, w in coeffs)
    first = np.stack([f for f, _ in coeffs])
    weights = np.zeros((len(sizes), out_size, k), np.int32)
    for i, (_, w) in enumerate(coeffs):
        weights[i, :, :w.shape[1]] = w
    return first, weights


def group_inputs(params: Sequence[ViewParams], plan: GroupPlan, out_hw: tuple[int, int],
                 interpolation: str) -> dict[str, torch.Tensor]:
    """Everything but the pixels that a device needs to render a group (host side: tables, weights)."""
    views = [params[i] for i in plan.index]
    for p in views:
        if p.contrast_mean is None and op_enabled(CONTRAST, p):
            raise ValueError("a view with contrast jitter needs its contrast mean (targets.views.measure_view)")
    programs = [_program(p, p.order, p.contrast_mean or 0) for p in views]
    h_first, h_weights = _axis_weights([p.width for p in views], out_hw[1], interpolation)
    v_first, v_weights = _axis_weights([p.height for p in views], out_hw[0], interpolation)
    out = {"index": torch.tensor(plan.index, dtype=torch.int64),
           "width": torch.tensor([p.width for p in views], dtype=torch.int64),
           "flip": torch.tensor([p.flip for p in views], dtype=torch.bool),
           "h_first": torch.from_numpy(h_first), "h_weights": torch.from_numpy(h_weights),
           "v_first": torch.from_numpy(v_first), "v_weights": torch.from_numpy(v_weights),
           "vertical_first": torch.tensor(plan.vertical_first)}
    if any(pr.pre is not _IDENTITY for pr in programs):
        out["pre"] = torch.from_numpy(np.stack([pr.pre for pr in programs]))
    if any(pr.saturation != 1.0 for pr in programs):
        out["saturation"] = torch.tensor([pr.saturation for pr in programs], dtype=torch.float32)
    if any(pr.post is not _IDENTITY for pr in programs):
        out["post"] = torch.from_numpy(np.stack([pr.post for pr in programs]))
    return out


def pad_crops(crops: Sequence[np.ndarray], plan: GroupPlan) -> torch.Tensor:
    """Host side: the group's crops (uint8 [h, w, 3], unflipped) top-left in one uint8 [n, hp, wp, 3]."""
    x = np.zeros((len(plan.index), plan.hp, plan.wp, 3), np.uint8)
    for j, i in enumerate(plan.index):
        c = crops[i]
        x[j, :c.shape[0], :c.shape[1]] = c
    return torch.from_numpy(x)


def _dense(first: torch.Tensor, weights: torch.Tensor, in_pad: int, size: torch.Tensor | None = None,
           flip: torch.Tensor | None = None) -> torch.Tensor:
    """[n, out, in_pad] float64 from compact weights; flipped rows read the input from its right end."""
    n, out, k = weights.shape
    cols = first.unsqueeze(-1) + torch.arange(k, device=first.device)
    if flip is not None:
        mirrored = size.view(n, 1, 1) - 1 - cols
        cols = torch.where(flip.view(n, 1, 1), mirrored, cols)
    cols = cols.clamp_(0, in_pad - 1)  # padded taps have weight 0
    dense = torch.zeros((n, out, in_pad), dtype=torch.float64, device=first.device)
    return dense.scatter_add_(2, cols, weights.to(torch.float64))


def render_group(pixels: torch.Tensor, g: dict[str, torch.Tensor], vertical_first: bool) -> torch.Tensor:
    """Device side: padded crops uint8 [n, hp, wp, 3] and `group_inputs` (on the same device) ->
    views uint8 [n, 3, oh, ow]. Nothing here waits for the device."""
    n, hp, wp, _ = pixels.shape
    oh, ow = g["v_weights"].shape[1], g["h_weights"].shape[1]
    x = _run_programs(pixels, g.get("pre"), g.get("saturation"), g.get("post"))
    wh = _dense(g["h_first"], g["h_weights"], wp, g["width"], g["flip"]).transpose(1, 2)  # [n, wp, ow]
    wv = _dense(g["v_first"], g["v_weights"], hp)  # [n, oh, hp]
    if vertical_first:  # [n, oh, hp] @ [n, hp, wp * 3], then [n, oh * 3, wp] @ [n, wp, ow]
        cols = _fixed_point_round(torch.bmm(wv, x.to(torch.float64).view(n, hp, wp * 3)))
        cols = cols.view(n, oh, wp, 3).permute(0, 1, 3, 2).reshape(n, oh * 3, wp)
        out = _fixed_point_round(torch.bmm(cols, wh)).view(n, oh, 3, ow)
    else:  # [n, 3 * hp, wp] @ [n, wp, ow], then [n, oh, hp] @ [n, hp, 3 * ow]
        planes = x.permute(0, 3, 1, 2).to(torch.float64).reshape(n, 3 * hp, wp)
        rows = _fixed_point_round(torch.bmm(planes, wh))
        rows = rows.view(n, 3, hp, ow).permute(0, 2, 1, 3).reshape(n, hp, 3 * ow)
        out = _fixed_point_round(torch.bmm(wv, rows)).view(n, oh, 3, ow)
    return out.permute(0, 2, 1, 3).to(torch.uint8)


def to_device(g: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copies that do not wait for the device: from pinned memory on a GPU (a copy from pageable memory
    may wait for the work queued before it)."""
    if device.type == "cuda":
        g = {k: v if v.is_pinned() else v.pin_memory() for k, v in g.items()}
    return {k: v.to(device, non_blocking=True) for k, v in g.items()}


class DeviceViews:
    """Makes views of one size on `device`, from crops already there (`make`) or from groups padded on
    the host (`make_batch`, stage 2's loader workers).

    crops are uint8 [h, w, 3] tensors holding each view's crop box in the unflipped frame (`crop_box`
    cuts them); params are the views' ViewParams with their contrast means (`measure_view`).
    """

    def __init__(self, size: int | tuple[int, int], interpolation: str, device: torch.device | str = "cpu",
                 group_elements: int = 1 << 26):
        check_supported(interpolation)
        self.out_hw = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = interpolation
        self.device = torch.device(device)
        self.group_elements = group_elements

    def make(self, crops: Sequence[torch.Tensor], params: Sequence[ViewParams]) -> torch.Tensor:
        """-> uint8 [N, 3, S, S] on the device, bit-exact with `apply_view` of the same parameters."""
        if len(crops) != len(params):
            raise ValueError(f"{len(crops)} crops for {len(params)} views")
        for c, p in zip(crops, params, strict=True):
            if tuple(c.shape) != (p.height, p.width, 3):
                raise ValueError(f"crop of shape {tuple(c.shape)} for a {p.height}x{p.width} view box")
        out = torch.empty((len(crops), 3, *self.out_hw), dtype=torch.uint8, device=self.device)
        for plan in plan_groups([(p.height, p.width) for p in params], self.out_hw, self.group_elements):
            inputs = group_inputs(params, plan, self.out_hw, self.interpolation)
            vertical = bool(inputs.pop("vertical_first"))
            g = to_device(inputs, self.device)
            x = torch.zeros((len(plan.index), plan.hp, plan.wp, 3), dtype=torch.uint8, device=self.device)
            for j, i in enumerate(plan.index):
                x[j, :params[i].height, :params[i].width] = crops[i]
            out[g["index"]] = render_group(x, g, vertical)
        return out

    def make_batch(self, groups: Sequence[dict[str, torch.Tensor]], n: int) -> torch.Tensor:
        """Views of a batch whose groups were padded on the host (`pad_crops` as "pixels" beside
        `group_inputs`) -> uint8 [n, 3, S, S] on the device."""
        out = torch.empty((n, 3, *self.out_hw), dtype=torch.uint8, device=self.device)
        for g in groups:
            g = dict(g)
            vertical = bool(g.pop("vertical_first"))  # read on the host: no wait for the device
            g = to_device(g, self.device)
            out[g["index"]] = render_group(g.pop("pixels"), g, vertical)
        return out


def crop_pixels(image, p: ViewParams) -> np.ndarray:
    """The view's crop box of a PIL image as uint8 [h, w, 3] (unflipped): only the box is copied."""
    left = image.width - p.left - p.width if p.flip else p.left
    return np.asarray(image.crop((left, p.top, left + p.width, p.top + p.height)))


def crop_box(image: np.ndarray | torch.Tensor, p: ViewParams):
    """The view's crop box of an [H, W, 3] image in the unflipped frame (a view, no copy)."""
    W = image.shape[1]
    left = W - p.left - p.width if p.flip else p.left
    return image[p.top:p.top + p.height, left:left + p.width]
