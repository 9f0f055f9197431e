"""Pictures of views and latents: PCA-to-RGB maps of patch tokens (the DINOv2 picture: three principal
components fitted over a set of tokens, one colour basis for all of them), crop boxes drawn on an image, masks
over a view, and PNG encoding. Used by `cae2 inspect --report` and pretrain's TensorBoard images."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

VIEW_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                (240, 50, 230), (210, 245, 60)]
"""One colour per view index (its crop box and its label)."""


@dataclass(frozen=True)
class PcaBasis:
    """Three principal components of a set of tokens and the range each is shown over (its 1st-99th
    percentile over the fitting tokens), so maps made with one basis share their colours."""

    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [3, D]
    low: torch.Tensor  # [3]
    high: torch.Tensor  # [3]

    @classmethod
    def fit(cls, tokens: torch.Tensor) -> PcaBasis:
        """tokens [N, D] (N >= 3)."""
        x = tokens.detach().float().cpu()
        mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
        components = v[:3]
        if components.shape[0] < 3:  # fewer dimensions than colours: the missing ones stay grey
            components = torch.cat([components, torch.zeros(3 - components.shape[0], x.shape[1])])
        # A component's sign is arbitrary: fix it so that its largest loading is positive (stable colours).
        signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True))).squeeze(1)
        components = components * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
        proj = (x - mean) @ components.T
        low, high = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
        return cls(mean, components, low, high)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, D] -> components [T, 3], scaled to [0, 1] over the fitted range (clipped)."""
        proj = (tokens.detach().float().cpu() - self.mean) @ self.components.T
        span = torch.where(self.high > self.low, self.high - self.low, torch.ones_like(self.high))
        return ((proj - self.low) / span).clamp(0, 1)

    def rgb(self, tokens: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
        """Patch tokens [gh * gw, D] -> uint8 [gh, gw, 3], row-major as the teacher's grid."""
        return (self.project(tokens).reshape(grid[0], grid[1], 3) * 255 + 0.5).to(torch.uint8).numpy()


def pixels(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """A normalised image [3, H, W] (any device, any float) -> uint8 [3, H, W] on the CPU."""
    m = torch.tensor(mean, device=image.device).view(3, 1, 1)
    s = torch.tensor(std, device=image.device).view(3, 1, 1)
    return ((image.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def view_image(view: torch.Tensor) -> Image.Image:
    """uint8 [3, H, W] -> an RGB image."""
    return Image.fromarray(view.permute(1, 2, 0).contiguous().numpy())


def enlarge(rgb: np.ndarray, size: int | tuple[int, int]) -> Image.Image:
    """A token map uint8 [gh, gw, 3] shown at `size` (nearest: one flat square per token)."""
    wh = (size, size) if isinstance(size, int) else (size[1], size[0])
    return Image.fromarray(rgb).resize(wh, Image.Resampling.NEAREST)


def with_mask(view: Image.Image, mask: np.ndarray, grey: int = 128) -> Image.Image:
    """The view with its masked patches (mask [gh, gw] True) greyed out: what the encoder does not see."""
    cells = Image.fromarray(mask.astype(np.uint8) * 255).resize(view.size, Image.Resampling.NEAREST)
    greyed = Image.blend(view, Image.new("RGB", view.size, (grey, grey, grey)), 0.75)
    return Image.composite(greyed, view, cells)


def only_masked(rgb: np.ndarray, mask: np.ndarray, grey: int = 128) -> np.ndarray:
    """A token map with the unmasked tokens grey: the regressor predicts the masked ones only."""
    out = rgb.copy()
    out[~mask.astype(bool)] = grey
    return out


def crop_boxes(image: Image.Image, boxes: list[tuple[int, int, int, int, bool]], width: int = 3) -> Image.Image:
    """The image with each view's crop box (top, left, height, width in the image's own frame, flipped) drawn
    in its view colour, labelled v<k>, and `<->` for a flipped view."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w = max(1, round(width * max(out.size) / 256))
    for k, (top, left, height, wid, flip) in enumerate(boxes):
        colour = VIEW_COLOURS[k % len(VIEW_COLOURS)]
        draw.rectangle([left, top, left + wid - 1, top + height - 1], outline=colour, width=w)
        label = f"v{k}{' <->' if flip else ''}"
        draw.rectangle([left, top, left + 8 * len(label) + 4, top + 13], fill=colour)
        draw.text((left + 2, top + 1), label, fill=(255, 255, 255))
    return out


def fit_within(image: Image.Image, size: int) -> Image.Image:
    """The image scaled so that its longer side is `size` (aspect kept)."""
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BICUBIC)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    """The image as a PNG data URI, for a page that carries its pictures."""
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def sheet(rows: list[list[Image.Image | None]], cell: int, gap: int = 4) -> Image.Image:
    """A contact sheet: rows of images, each fitted into a `cell` square (None: an empty cell)."""
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * (cell + gap) + gap, len(rows) * (cell + gap) + gap), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            if image is None:
                continue
            fitted = fit_within(image, cell)
            out.paste(fitted, (gap + j * (cell + gap) + (cell - fitted.width) // 2,
                               gap + i * (cell + gap) + (cell - fitted.height) // 2))
    return out
