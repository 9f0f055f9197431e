"""Image decoders whose pixels views are cut from, and which images each one takes.

    pillow        Pillow on the host (libjpeg-turbo; any format Pillow reads): the reference
    torchvision   torchvision.io.decode_jpeg on CPU tensors (libjpeg-turbo, the same IDCT and chroma
                  upsampling as Pillow: the same pixels)
    nvjpeg        torchvision.io.decode_jpeg on a CUDA device (batched nvJPEG): pixels that differ
                  slightly from libjpeg-turbo's (docs/benchmarks.md, decoders)

A store records the decoder of its views (`StoreMeta.decoder`). The device decoders take plain JPEGs
only; an image they cannot take (`device_decodable`) is decoded by Pillow instead, and its unit's
completion marker records the row (`decoded_on_host`), so that stage 2 decodes it the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from cae2.errors import UserError

DECODERS = ("pillow", "torchvision", "nvjpeg")
DECODER_CHOICES = ("host", "device")
SAME_PIXELS = {"pillow", "torchvision"}
"""Decoders that give the same pixels: a store made by one is read exactly by the others."""

_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "differential",
        0xC6: "differential progressive", 0xC7: "differential lossless", 0xC9: "arithmetic",
        0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless", 0xCD: "arithmetic differential",
        0xCE: "arithmetic differential progressive", 0xCF: "arithmetic differential lossless"}
_STANDALONE = {0x01, *range(0xD0, 0xDA)}  # markers without a length field (TEM, RSTn, SOI, EOI)
_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2)}  # 4:4:4 4:2:2 4:4:0 4:2:0 4:1:1 4:1:0


def device_decoder_name(device: torch.device | str) -> str:
    """The decoder `decode_on_device` is on this device."""
    return "nvjpeg" if torch.device(device).type == "cuda" else "torchvision"


@dataclass(frozen=True)
class JpegInfo:
    height: int
    width: int
    host_reason: str | None
    """Why a device decoder does not take this image (Pillow decodes it), or None."""


def device_decodable(data: bytes) -> JpegInfo:
    """Read the JPEG's header (not its pixels): its size, and whether a device decoder takes it: 8-bit
    baseline or extended Huffman JPEGs of three YCbCr components with common chroma sampling, whole
    (ending in an EOI marker). Everything else (PNG, grayscale, CMYK, progressive, arithmetic, 12-bit,
    RGB-coded, cut short, huge) goes to Pillow."""
    if data[:2] != b"\xff\xd8":
        return JpegInfo(0, 0, "not a JPEG")
    if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return JpegInfo(0, 0, "no end marker (cut short?)")
    adobe_transform, pos = None, 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return JpegInfo(0, 0, "unreadable header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        if marker in _SOF:
            return _frame_info(marker, segment, adobe_transform)
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    return JpegInfo(0, 0, "no frame header")


def _frame_info(marker: int, segment: bytes, adobe_transform: int | None) -> JpegInfo:
    if len(segment) < 6:
        return JpegInfo(0, 0, "unreadable frame header")
    precision, height, width, ncomp = segment[0], int.from_bytes(segment[1:3], "big"), \
        int.from_bytes(segment[3:5], "big"), segment[5]
    sampling = [(segment[7 + 3 * c] >> 4, segment[7 + 3 * c] & 15) for c in range(ncomp) if 8 + 3 * c <= len(segment)]

    def host(reason: str) -> JpegInfo:
        return JpegInfo(height, width, reason)

    if marker not in (0xC0, 0xC1):
        return host(f"{_SOF[marker]} JPEG")
    if precision != 8:
        return host(f"{precision}-bit JPEG")
    if ncomp != 3:
        return host({1: "grayscale JPEG", 4: "CMYK JPEG"}.get(ncomp, f"{ncomp}-component JPEG"))
    if adobe_transform == 0:
        return host("RGB-coded JPEG")
    if len(sampling) != 3 or sampling[0] not in _LUMA_SAMPLING or sampling[1] != (1, 1) or sampling[2] != (1, 1):
        return host(f"chroma sampling {sampling}")
    if height < 1 or width < 1:
        return host("no pixels")
    if Image.MAX_IMAGE_PIXELS and height * width > 2 * Image.MAX_IMAGE_PIXELS:  # Pillow refuses decompression bombs
        return host("too many pixels")
    return JpegInfo(height, width, None)


def decode_on_device(datas: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """JPEG files (uint8 [bytes] each, on the host) -> RGB images uint8 [H, W, 3] on `device`, in one
    batched call (nvJPEG on a GPU). Raises RuntimeError when one of them fails (`decode_all`)."""
    if not datas:
        return []
    out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=torch.device(device))
    return [image.permute(1, 2, 0) for image in out]


def decode_all(datas: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | str]:
    """Batched decode, image by image only when the batch fails: each image, or why it failed."""
    try:
        return list(decode_on_device(datas, device))
    except RuntimeError:
        pass
    out = []
    for data in datas:
        try:
            out.append(decode_on_device([data], device)[0])
        except RuntimeError as e:
            reason = re.sub(r"^.*?\.(cpp|cu):\d+, ", "", str(e).splitlines()[0] if str(e) else type(e).__name__)
            out.append(f"{device_decoder_name(device)} failed: {reason}")
    return out


def require_device_view_path(view_path: str) -> None:
    """--decoder device cuts its views where it decodes: on the device view path."""
    if view_path != "device":
        raise UserError("--decoder device: device-decoded images are cut into views on the device; pass "
                        f"--view-path device (this run's is {view_path}), or --decoder host")


@dataclass(frozen=True)
class DecoderUse:
    """How a stage-2 run decodes the images of a store."""

    name: str
    on_device: bool
    """The training device decodes the images it takes; Pillow in the workers decodes the rest."""
    crossing: str | None
    """Said in the log when the pixels may differ from the store's views'."""


STAGE2_DECODERS = ("store", "host", "device")


def resolve_decoder(choice: str, store_decoder: str, device: torch.device, view_path: str) -> DecoderUse:
    """--decoder store|host|device against the store's decoder: 'store' decodes as the store's views were
    decoded (or with a decoder of the same pixels); crossing to other pixels is only done when asked for."""
    on_device_name = device_decoder_name(device)
    if choice == "device":
        require_device_view_path(view_path)
    if choice == "store":
        if store_decoder == on_device_name and store_decoder != "pillow" and view_path == "device":
            return DecoderUse(store_decoder, True, None)
        if store_decoder in SAME_PIXELS:
            return DecoderUse("pillow", False, None)
        raise UserError(f"--targets: the store's views were cut from {store_decoder}-decoded images, and this run "
                        f"({device}, {view_path} view path) decodes with "
                        f"{on_device_name if view_path == 'device' else 'pillow'}; run on the device kind that made "
                        "the store with --view-path device, or pass --decoder host to decode with Pillow (pixels "
                        "differ slightly: docs/benchmarks.md, decoders)")
    name = on_device_name if choice == "device" else "pillow"
    same = name == store_decoder or {name, store_decoder} <= SAME_PIXELS
    crossing = None if same else (f"decoding with {name}, the store's views came from {store_decoder}-decoded "
                                  "images: the pixels differ slightly (docs/benchmarks.md, decoders)")
    return DecoderUse(name, choice == "device", crossing)
