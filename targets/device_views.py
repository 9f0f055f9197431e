"""Views on the accelerator: `targets.views.apply_view` over a packed batch of whole images,
bit-exact with it, everything but the decode on the images' device.

The host packs decoded images (uint8 HWC) back to back into one buffer (`PackedImages`) and hands on
the views' stored records; on the device, vectorised over the batch, come the contrast means (stage
1), the jitter tables and the resampling coefficients (`targets.view_inputs`: Pillow's float32 blend
tables and its RGB -> L, its 22-bit fixed-point coefficients with the same double operations, its
choice of which pass runs first), then the rendering, Pillow's integer arithmetic:

- on a GPU (or CPU tensors with TRITON_INTERPRET=1): Triton kernels that read each view's crop in place
  in its image, jitter it, resample one axis into a packed intermediate (rounded to uint8 as Pillow
  does) and then the other (`targets.view_kernels`): no crop copies, no padding, integer sums;
- elsewhere: a plain-torch renderer view by view, each pass a float64 matrix product (every term an
  integer below 2^53, so exact in any order), Pillow's rounding after each.

Both give the Pillow path's pixels, bit for bit, from the same decoded image. Hue jitter (0 in CAE v2)
and filters other than bicubic and bilinear are refused: they stay on the Pillow path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from targets import view_inputs as vi
from targets.views import ViewParams

try:  # a CPU-only install has no Triton: the plain-torch renderer serves
    from targets import view_kernels as vk
except ImportError:  # pragma: no cover - depends on the install
    vk = None

def check_supported(interpolation: str, hue: float = 0.0) -> None:
    """Raise ValueError for what the device path does not reproduce."""
    if interpolation not in vi.SUPPORT:
        raise ValueError(f"the device view path resamples with {' or '.join(vi.SUPPORT)}, not {interpolation!r}; "
                         "use the Pillow view path (--view-path pillow)")
    if hue:
        raise ValueError(f"the device view path has no hue jitter (settings hue = {hue}); "
                         "use the Pillow view path (--view-path pillow)")


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
    return x.add_(1 << (vi.PRECISION_BITS - 1)).div_(1 << vi.PRECISION_BITS).floor_().clamp_(0, 255)


def _dense(first: torch.Tensor, weights: torch.Tensor, in_pad: int, size: torch.Tensor | None = None,
           flip: torch.Tensor | None = None) -> torch.Tensor:
    """[n, out, in_pad] float64 from compact weights; flipped rows read the input from its right end."""
    n, out, k = weights.shape
    cols = first.unsqueeze(-1) + torch.arange(k, device=first.device)
    if flip is not None:
        assert size is not None, "a flipped row reads from its input's right end: pass the input sizes"
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


def crop_record(image, ints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A view's crop box of a PIL image, uint8 [h, w, 3] in the unflipped frame (only the box is copied),
    and the view's record relative to it (top and left 0): what stage 2's workers hand to the device."""
    flip, top, left, h, w = (int(ints[i]) for i in (vi.FLIP, vi.TOP, vi.LEFT, vi.HEIGHT, vi.WIDTH))
    left = image.width - left - w if flip else left
    rec = np.array(ints, dtype=np.int32)
    rec[vi.TOP], rec[vi.LEFT] = 0, 0
    return np.asarray(image.crop((left, top, left + w, top + h))), rec


def _layout(hw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images of sizes hw (int64 [m, 2]) back to back, 3 bytes a pixel -> (bytes, start) of each."""
    sizes = hw[:, 0] * hw[:, 1] * 3
    return sizes, (np.cumsum(sizes) - sizes).astype(np.int64)


@dataclass
class PackedImages:
    """Whole images (uint8 [H, W, 3]) back to back in one buffer."""

    pixels: torch.Tensor
    """uint8 [sum of H x W x 3]."""
    offsets: torch.Tensor
    """int64 [m]: where each image starts."""
    heights: torch.Tensor
    widths: torch.Tensor
    hw: np.ndarray
    """int64 [m, 2]: the image sizes, on the host (what the batch's plan is made from)."""

    @classmethod
    def pack(cls, images: Sequence[torch.Tensor | np.ndarray], pin: bool = False,
             buffer: torch.Tensor | None = None) -> PackedImages:
        """One copy of each image into one buffer: `buffer` when it is large enough, else a new (pinned) one."""
        hw = np.array([im.shape[:2] for im in images], dtype=np.int64).reshape(-1, 2)
        sizes, starts = _layout(hw)
        total = int(sizes.sum())
        pixels = buffer[:total] if buffer is not None and buffer.numel() >= total else \
            torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        flat = pixels.numpy()
        for im, start, size in zip(images, starts, sizes, strict=True):
            flat[start:start + size] = (im.numpy() if isinstance(im, torch.Tensor) else np.asarray(im)).reshape(-1)
        return cls(pixels, torch.from_numpy(starts), torch.from_numpy(hw[:, 0].copy()),
                   torch.from_numpy(hw[:, 1].copy()), hw)

    @classmethod
    def join(cls, images: list[torch.Tensor], device: torch.device) -> PackedImages:
        """Images already on `device` (uint8 [H, W, 3], any strides) -> one packed buffer there."""
        hw = np.array([im.shape[:2] for im in images], dtype=np.int64).reshape(-1, 2)
        starts = _layout(hw)[1]
        pixels = torch.cat([im.reshape(-1) for im in images]) if images else \
            torch.empty(0, dtype=torch.uint8, device=device)
        offsets, heights, widths = (torch.from_numpy(a).to(device, non_blocking=True) for a in
                                    (starts, hw[:, 0].copy(), hw[:, 1].copy()))
        return cls(pixels, offsets, heights, widths, hw)

    def images(self) -> list[torch.Tensor]:
        """Each image, uint8 [H, W, 3], a view of the buffer (the sizes come from the host's copy)."""
        sizes, starts = _layout(self.hw)
        return [self.pixels[start:start + size].view(int(h), int(w), 3)
                for start, size, (h, w) in zip(starts.tolist(), sizes.tolist(), self.hw, strict=True)]

    def pin_memory(self) -> PackedImages:
        """For a DataLoader's pin-memory thread: the pixels in page-locked memory (copies that do not wait)."""
        return PackedImages(self.pixels.pin_memory(), self.offsets, self.heights, self.widths, self.hw)

    def to(self, device: torch.device) -> PackedImages:
        pixels, offsets, heights, widths = (t.to(device, non_blocking=True) for t in
                                            (self.pixels, self.offsets, self.heights, self.widths))
        return PackedImages(pixels, offsets, heights, widths, self.hw)


class Packer:
    """Packs batches of images for `device` into host buffers that it keeps (pinned for a GPU): a fresh
    buffer per batch would cost a page fault every 4 KiB (~70 us per ImageNet image). `slots` buffers take
    turns; one is written again only after the copy that read it has finished."""

    def __init__(self, device: torch.device, slots: int = 3):
        self.device, self.pin = torch.device(device), torch.device(device).type == "cuda"
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.copied: list[torch.cuda.Event | None] = [None] * slots
        self.turn = 0

    def to_device(self, images: Sequence[torch.Tensor | np.ndarray]) -> PackedImages:
        """The images packed on the device: host images copied through a buffer, images already on a GPU
        (decoded there) joined with them in order on the device."""
        there = [isinstance(im, torch.Tensor) and im.device.type != "cpu" for im in images]
        if not any(there):
            return self._copy(images)
        on_host = [im for im, d in zip(images, there, strict=True) if not d]
        host = iter(self._copy(on_host).images() if on_host else [])
        joined = [torch.as_tensor(im) if d else next(host) for im, d in zip(images, there, strict=True)]
        return PackedImages.join(joined, self.device)

    def _copy(self, images: Sequence[torch.Tensor | np.ndarray]) -> PackedImages:
        slot, self.turn = self.turn % len(self.buffers), self.turn + 1
        copied = self.copied[slot]
        if copied is not None:
            copied.synchronize()
        need = sum(im.shape[0] * im.shape[1] * 3 for im in images)
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < need:  # as large as any batch so far
            size = int(max([need, *(b.numel() for b in self.buffers if b is not None)]) * 1.25)
            buffer = self.buffers[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            if not self.pin:  # pinned pages are resident already; pageable ones fault in once, here
                buffer.zero_()
        packed = PackedImages.pack(images, buffer=buffer).to(self.device)
        if self.pin:
            event = self.copied[slot] = torch.cuda.Event()
            event.record()
        return packed


def kernels_for(device: torch.device) -> ModuleType | None:
    """The Triton kernels where they run (a GPU, or Triton's interpreter), else None: the plain-torch renderer."""
    return vk if vk is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") else None


def use_kernels(device: torch.device) -> bool:
    return kernels_for(device) is not None


def contrast_means(images: PackedImages, owner: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor,
                   plan: vi.BatchPlan) -> torch.Tensor:
    """Each view's contrast mean (Pillow's: the L mean of the whole image after the jitter before contrast,
    rounded), -1 where contrast is off -> the records' ints with it filled in (int32 [n, 10]). The tensors
    are on the images' device."""
    device = images.pixels.device
    prog = vi.programs(ints, floats, before_contrast=True)
    npix = images.heights[owner] * images.widths[owner]
    kernels = kernels_for(device)
    if kernels is not None:
        n_blocks = int(plan.pixels.max()) // kernels.BLOCK + 1 if len(owner) else 1
        partial = torch.zeros((len(owner), n_blocks), dtype=torch.int32, device=device)
        kernels.launch(kernels.contrast_sums_kernel, (len(owner), n_blocks), images.pixels, images.offsets[owner],
                       npix, prog.pre, prog.saturation, prog.post, partial, n_blocks, HAS_SAT=True,
                       BLOCK=kernels.BLOCK)
        sums = partial.sum(1, dtype=torch.int64)
    else:
        sums = torch.stack([_gray_sum(_image(images, int(i)), prog, v) for v, i in enumerate(owner.tolist())]) \
            if len(owner) else torch.zeros(0, dtype=torch.int64, device=device)
    means = (sums.to(torch.float64) / npix.to(torch.float64) + 0.5).floor().to(torch.int32)
    out = ints.clone()
    out[:, vi.MEAN] = torch.where(floats[:, 1] != 1.0, means, torch.full_like(means, -1))
    return out


def _image(images: PackedImages, i: int) -> torch.Tensor:
    h, w, start = int(images.heights[i]), int(images.widths[i]), int(images.offsets[i])
    return images.pixels[start:start + h * w * 3].view(h, w, 3)


def _gray_sum(image: torch.Tensor, prog: vi.Programs, v: int) -> torch.Tensor:
    x = _run_programs(image[None], prog.pre[v:v + 1], prog.saturation[v:v + 1], prog.post[v:v + 1])[0]
    return _gray(x).sum(dtype=torch.int64)


@dataclass
class ViewGeometry:
    """Where each view's crop is in its image and how it is resampled."""

    top: torch.Tensor
    left: torch.Tensor
    """In the image's unflipped frame."""
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    horizontal: vi.Coefficients
    vertical: vi.Coefficients
    vertical_first: torch.Tensor

    @classmethod
    def of(cls, images: PackedImages, owner: torch.Tensor, ints: torch.Tensor, out_hw: tuple[int, int],
           interpolation: str, plan: vi.BatchPlan) -> ViewGeometry:
        flip, top, left, h, w = (ints[:, i].long() for i in (vi.FLIP, vi.TOP, vi.LEFT, vi.HEIGHT, vi.WIDTH))
        left = torch.where(flip != 0, images.widths[owner] - left - w, left)
        return cls(top, left, h, w, flip, vi.coefficients(w, out_hw[1], interpolation, plan.k_horizontal),
                   vi.coefficients(h, out_hw[0], interpolation, plan.k_vertical),
                   torch.from_numpy(plan.vertical_first))


def render(images: PackedImages, owner: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor,
           out_hw: tuple[int, int], interpolation: str, plan: vi.BatchPlan) -> torch.Tensor:
    """The views (records `ints` [n, 10] with contrast means, `floats` [n, 4] on the images' device; view i
    cut from image owner[i]) -> uint8 [n, 3, H, W] there, bit-exact with `targets.views.apply_view`."""
    device = images.pixels.device
    prog = vi.programs(ints, floats)
    geo = ViewGeometry.of(images, owner, ints, out_hw, interpolation, plan)
    out = torch.empty((len(owner), 3, *out_hw), dtype=torch.uint8, device=device)
    if not len(owner):
        return out
    kernels = kernels_for(device)
    if kernels is not None:
        _render_kernels(kernels, images, owner, prog, geo, out, out_hw, plan)
    else:
        for v, i in enumerate(owner.tolist()):
            out[v] = _render_one(images, i, v, prog, geo)
    return out


def _render_one(images: PackedImages, i: int, v: int, prog: vi.Programs, geo: ViewGeometry) -> torch.Tensor:
    """One view with the plain-torch renderer (float64 products of exact integers)."""
    t, lft, h, w = (int(x[v]) for x in (geo.top, geo.left, geo.height, geo.width))
    crop = _image(images, i)[t:t + h, lft:lft + w][None]
    g = {"h_first": geo.horizontal.first[v:v + 1], "h_weights": geo.horizontal.weights[v:v + 1],
         "v_first": geo.vertical.first[v:v + 1], "v_weights": geo.vertical.weights[v:v + 1],
         "width": geo.width[v:v + 1], "flip": geo.flip[v:v + 1] != 0, "pre": prog.pre[v:v + 1],
         "saturation": prog.saturation[v:v + 1], "post": prog.post[v:v + 1]}
    return render_group(crop.contiguous(), g, bool(geo.vertical_first[v]))[0]


def _render_kernels(kernels: ModuleType, images, owner, prog, geo, out, out_hw, plan: vi.BatchPlan) -> None:
    """The kernel launches, every size from the host's plan: nothing here waits for the device."""
    vk = kernels
    oh, ow = out_hw
    device = out.device
    base = images.offsets[owner]
    stride = images.widths[owner] * 3
    mid_off = torch.from_numpy(np.cumsum(plan.mid_len) - plan.mid_len).to(device, non_blocking=True)
    mid = torch.empty(int(plan.mid_len.sum()), dtype=torch.uint8, device=device)
    hc, vc = geo.horizontal, geo.vertical
    h_kmax, v_kmax = hc.taps.amax(1).int(), vc.taps.amax(1).int()
    for horizontal_first in (True, False):
        chosen = np.flatnonzero(plan.vertical_first != horizontal_first)
        if not len(chosen):
            continue
        views = torch.from_numpy(chosen).to(device, non_blocking=True)
        c1, c2 = (hc, vc) if horizontal_first else (vc, hc)
        k1, k2 = (h_kmax, v_kmax) if horizontal_first else (v_kmax, h_kmax)
        elements = int((plan.mid_len[chosen] // 3).max())
        vk.launch(vk.first_pass_kernel, (len(chosen), elements // vk.BLOCK + 1), views, images.pixels, base,
                  stride, geo.top, geo.left, geo.height, geo.width, geo.flip, prog.pre, prog.saturation, prog.post,
                  c1.first, c1.weights, c1.weights.shape[2], k1, mid, mid_off, ow if horizontal_first else oh,
                  HORIZONTAL=horizontal_first, HAS_SAT=plan.saturation, BLOCK=vk.BLOCK)
        vk.launch(vk.second_pass_kernel, (len(chosen), oh * ow // vk.BLOCK + 1), views, mid, mid_off, geo.width,
                  geo.flip, c2.first, c2.weights, c2.weights.shape[2], k2, out, oh, ow,
                  HORIZONTAL=not horizontal_first, BLOCK=vk.BLOCK)


class DeviceViews:
    """Views of one size and resampling filter on `device`: `measure` fills in the contrast means (stage
    1), `render` cuts the views. Records are `ViewParams.to_record`'s, view i cut from image owner[i]."""

    def __init__(self, size: int | tuple[int, int], interpolation: str, device: torch.device | str = "cpu"):
        check_supported(interpolation)
        self.out_hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.interpolation = interpolation
        self.device = torch.device(device)

    def plan(self, images: PackedImages, owner, ints, floats) -> vi.BatchPlan:
        """The batch's launch sizes, from the records on the host (measuring the contrast means changes none)."""
        return vi.BatchPlan.of(images.hw, np.asarray(owner), np.asarray(ints), np.asarray(floats), self.out_hw,
                               self.interpolation)

    def measure(self, images: PackedImages, owner, ints, floats, plan: vi.BatchPlan | None = None) -> torch.Tensor:
        """The records' ints with the contrast means measured (stage 1), on the device; the records may
        be on the host (then the plan is made from them) or, with `plan`, anywhere."""
        plan = plan or self.plan(images, owner, ints, floats)
        return contrast_means(images, *self._on_device(owner, ints, floats), plan)

    def render(self, images: PackedImages, owner, ints, floats, plan: vi.BatchPlan | None = None) -> torch.Tensor:
        """The views, uint8 [n, 3, H, W] on the device; records and plan as for `measure`."""
        plan = plan or self.plan(images, owner, ints, floats)
        return render(images, *self._on_device(owner, ints, floats), self.out_hw, self.interpolation, plan)

    def _on_device(self, owner, ints, floats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        owner, ints, floats = (torch.as_tensor(t).to(self.device, non_blocking=True) for t in (owner, ints, floats))
        return owner, ints, floats

    def make(self, images: list, params: list[ViewParams], owner: list[int] | None = None) -> torch.Tensor:
        """Views of decoded images (uint8 [H, W, 3]) by their parameters, with their contrast means."""
        records = [p.to_record() for p in params]
        packed = PackedImages.pack(images).to(self.device)
        owner = list(range(len(params))) if owner is None else owner
        return self.render(packed, owner, np.stack([r[0] for r in records]), np.stack([r[1] for r in records]))
