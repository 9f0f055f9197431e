"""Triton kernels of the device view path: Pillow's integer arithmetic over a packed batch of whole
images (no crops copied, no padding), exact whatever the fusion because every sum is an integer sum.

    contrast sums   per view, the L values of its whole image after the jitter before contrast
    first pass      per view, the jittered crop (read in place in its image) resampled along one axis
    second pass     the other axis, into the views' [3, H, W] uint8 output

A view's crop box is given in its image's unflipped frame; the flip is folded into the horizontal
pass, which reads column w - 1 - j for its input column j. Pillow rounds between the passes: the first
pass writes uint8 to a packed intermediate buffer, one region per view. The saturation blend is
Pillow's float32 `gray + alpha * (x - gray)`: the launch switches floating-point fusion off so that it
rounds after the multiplication as Pillow's C loop does.

Run on a GPU; `TRITON_INTERPRET=1` runs them on CPU tensors for tests.
"""

from __future__ import annotations

import triton
import triton.language as tl

PRECISION_BITS = 22
BLOCK = 256


@triton.jit
def _jitter(r, g, b, pre_ptr, sat, post_ptr, HAS_SAT: tl.constexpr):
    """Pillow's colour ops of one view on uint8 channels (int32): table, saturation, table."""
    r = tl.load(pre_ptr + r).to(tl.int32)
    g = tl.load(pre_ptr + g).to(tl.int32)
    b = tl.load(pre_ptr + b).to(tl.int32)
    if HAS_SAT:
        gray = (r * 19595 + g * 38470 + b * 7471 + 32768) >> 16
        grayf = gray.to(tl.float32)
        r = tl.minimum(tl.maximum(((r - gray).to(tl.float32) * sat + grayf).to(tl.int32), 0), 255)
        g = tl.minimum(tl.maximum(((g - gray).to(tl.float32) * sat + grayf).to(tl.int32), 0), 255)
        b = tl.minimum(tl.maximum(((b - gray).to(tl.float32) * sat + grayf).to(tl.int32), 0), 255)
    r = tl.load(post_ptr + r).to(tl.int32)
    g = tl.load(post_ptr + g).to(tl.int32)
    b = tl.load(post_ptr + b).to(tl.int32)
    return r, g, b


@triton.jit
def _round8(acc):
    """Pillow's clip8 of a fixed-point sum that started at half a unit."""
    return tl.minimum(tl.maximum(acc >> 22, 0), 255)


@triton.jit
def contrast_sums_kernel(pixels, base, npix, pre, sat, post, partial, n_blocks, HAS_SAT: tl.constexpr,
                         BLOCK: tl.constexpr):
    """partial[v, block] = sum of Pillow's L over that block of view v's image after its jitter."""
    v = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < tl.load(npix + v)
    at = tl.load(base + v) + offs.to(tl.int64) * 3
    r = tl.load(pixels + at, mask=m, other=0).to(tl.int32)
    g = tl.load(pixels + at + 1, mask=m, other=0).to(tl.int32)
    b = tl.load(pixels + at + 2, mask=m, other=0).to(tl.int32)
    r, g, b = _jitter(r, g, b, pre + v * 256, tl.load(sat + v), post + v * 256, HAS_SAT)
    gray = (r * 19595 + g * 38470 + b * 7471 + 32768) >> 16
    tl.store(partial + v * n_blocks + blk, tl.sum(tl.where(m, gray, 0), axis=0))


@triton.jit
def first_pass_kernel(views, pixels, base, stride, top, left, crop_h, crop_w, flip, pre, sat, post,
                      first, weights, k_dim, k_max, mid, mid_off, out_len,
                      HORIZONTAL: tl.constexpr, HAS_SAT: tl.constexpr, BLOCK: tl.constexpr):
    """The jittered crop of each listed view resampled along one axis into its region of `mid`
    ([h, out_w, 3] horizontally, [out_h, w, 3] vertically; unflipped when vertical)."""
    v = tl.load(views + tl.program_id(0)).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    h, w = tl.load(crop_h + v), tl.load(crop_w + v)
    across = out_len if HORIZONTAL else w  # elements per row of this pass's output
    rows = h if HORIZONTAL else out_len
    m = offs < rows * across
    row, col = offs // across, offs % across
    o = col if HORIZONTAL else row  # the output index along the resampled axis
    start = tl.load(first + v * out_len + o, mask=m, other=0)
    pix0 = tl.load(base + v) + tl.load(top + v).to(tl.int64) * tl.load(stride + v) + tl.load(left + v).to(tl.int64) * 3
    flipped = tl.load(flip + v) != 0
    s, row_stride = tl.load(sat + v), tl.load(stride + v)
    acc_r = tl.full([BLOCK], 1 << 21, tl.int32)
    acc_g = tl.full([BLOCK], 1 << 21, tl.int32)
    acc_b = tl.full([BLOCK], 1 << 21, tl.int32)
    for k in range(0, tl.load(k_max + v)):
        wk = tl.load(weights + (v * out_len + o) * k_dim + k, mask=m, other=0)
        j = start + k
        if HORIZONTAL:
            j = tl.where(flipped, w - 1 - j, j)
            at = pix0 + row.to(tl.int64) * row_stride + j.to(tl.int64) * 3
        else:
            at = pix0 + j.to(tl.int64) * row_stride + col.to(tl.int64) * 3
        ok = m & (wk != 0)
        r = tl.load(pixels + at, mask=ok, other=0).to(tl.int32)
        g = tl.load(pixels + at + 1, mask=ok, other=0).to(tl.int32)
        b = tl.load(pixels + at + 2, mask=ok, other=0).to(tl.int32)
        r, g, b = _jitter(r, g, b, pre + v * 256, s, post + v * 256, HAS_SAT)
        acc_r += wk * r
        acc_g += wk * g
        acc_b += wk * b
    out = tl.load(mid_off + v) + offs.to(tl.int64) * 3
    tl.store(mid + out, _round8(acc_r).to(tl.uint8), mask=m)
    tl.store(mid + out + 1, _round8(acc_g).to(tl.uint8), mask=m)
    tl.store(mid + out + 2, _round8(acc_b).to(tl.uint8), mask=m)


@triton.jit
def second_pass_kernel(views, mid, mid_off, crop_w, flip, first, weights, k_dim, k_max, out, out_h, out_w,
                       HORIZONTAL: tl.constexpr, BLOCK: tl.constexpr):
    """The other axis of each listed view's intermediate into out[v] ([3, out_h, out_w] uint8)."""
    v = tl.load(views + tl.program_id(0)).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < out_h * out_w
    oy, ox = offs // out_w, offs % out_w
    w = tl.load(crop_w + v)
    o = ox if HORIZONTAL else oy
    n_out = out_w if HORIZONTAL else out_h
    start = tl.load(first + v * n_out + o, mask=m, other=0)
    flipped = tl.load(flip + v) != 0
    m0 = tl.load(mid_off + v)
    acc_r = tl.full([BLOCK], 1 << 21, tl.int32)
    acc_g = tl.full([BLOCK], 1 << 21, tl.int32)
    acc_b = tl.full([BLOCK], 1 << 21, tl.int32)
    for k in range(0, tl.load(k_max + v)):
        wk = tl.load(weights + (v * n_out + o) * k_dim + k, mask=m, other=0)
        j = start + k
        if HORIZONTAL:  # the intermediate is [out_h, w, 3], unflipped
            j = tl.where(flipped, w - 1 - j, j)
            at = m0 + (oy.to(tl.int64) * w + j) * 3
        else:  # the intermediate is [h, out_w, 3]
            at = m0 + (j.to(tl.int64) * out_w + ox) * 3
        ok = m & (wk != 0)
        acc_r += wk * tl.load(mid + at, mask=ok, other=0).to(tl.int32)
        acc_g += wk * tl.load(mid + at + 1, mask=ok, other=0).to(tl.int32)
        acc_b += wk * tl.load(mid + at + 2, mask=ok, other=0).to(tl.int32)
    plane = out_h * out_w
    at = out + v * 3 * plane + offs
    tl.store(at, _round8(acc_r).to(tl.uint8), mask=m)
    tl.store(at + plane, _round8(acc_g).to(tl.uint8), mask=m)
    tl.store(at + 2 * plane, _round8(acc_b).to(tl.uint8), mask=m)


def launch(kernel, grid, *args, **meta) -> None:
    """Launch with floating-point fusion off where the backend has the option (the saturation blend must
    round after its multiplication); the interpreter has no fusion."""
    try:
        kernel[grid](*args, **meta, enable_fp_fusion=False)
    except (TypeError, KeyError):
        kernel[grid](*args, **meta)
