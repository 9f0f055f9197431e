"""TensorBoard pictures of fine-tuning's mistakes: after every validation, the first `--misclassified`
validation images the main process got wrong, each as one row: the image as the network saw it (resized and
centre-cropped) captioned with its file, its class and the network's top 3, and the fine-tuned encoder's patch tokens as
a PCA-to-RGB map (one colour basis over the row set, as pretrain's pictures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from timm.models.beit import Beit

from pipelines.pictures import PcaBasis, enlarge, pixels, sheet, view_image

CAPTION = 14
"""Pixels per caption line."""


@dataclass
class Misclassified:
    """Collects up to `keep` misclassified images (`add`, batch after batch) and writes their pictures."""

    keep: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    """Each image's three most probable classes, with their probabilities."""
    indices: list[int] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.images) >= self.keep

    def add(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor) -> None:
        probs = logits.float().softmax(-1)
        p, c = probs.topk(min(3, probs.shape[1]), dim=1)
        for i in (c[:, 0] != labels).nonzero().flatten().tolist():
            if self.full:
                return
            self.images.append(images[i].detach().float().cpu())
            self.labels.append(int(labels[i]))
            self.top.append(list(zip(c[i].tolist(), p[i].tolist(), strict=True)))
            self.indices.append(int(indices[i]))

    @torch.no_grad()
    def write(self, encoder: Beit, writer, step: int, classes: list[str], name: Callable[[int], str]) -> None:
        """encoder: the plain network (not a DDP wrapper); `name`: an image's file from its index. One picture
        per image, misclassified/<i>."""
        if not self.images:
            return
        batch = torch.stack(self.images)
        was_training = encoder.training
        encoder.eval()
        try:
            device = next(encoder.parameters()).device
            tokens = encoder.forward_features(batch.to(device)).float().cpu()
        finally:
            encoder.train(was_training)
        patches = tokens[:, encoder.num_prefix_tokens:]
        grid = encoder.patch_embed.grid_size
        basis = PcaBasis.fit(patches.reshape(-1, patches.shape[-1]))
        size = batch.shape[-1]
        for i in range(batch.shape[0]):
            view = self._captioned(view_image(pixels(batch[i], self.mean, self.std)), i, classes, name)
            row: list[Image.Image | None] = [view, enlarge(basis.rgb(patches[i], (grid[0], grid[1])), size)]
            writer.add_image(f"misclassified/{i}", np.asarray(sheet([row], view.height)), step, dataformats="HWC")

    def _captioned(self, view: Image.Image, i: int, classes: list[str], name: Callable[[int], str]) -> Image.Image:
        """The view with lines under it: the image's file and class, then the top 3 with probabilities."""
        lines = [Path(name(self.indices[i])).name, f"class: {classes[self.labels[i]]}"]
        lines += [f"{p:.0%} {classes[c]}" for c, p in self.top[i]]
        out = Image.new("RGB", (view.width, view.height + CAPTION * len(lines) + 4), (255, 255, 255))
        out.paste(view, (0, 0))
        draw, font = ImageDraw.Draw(out), ImageFont.load_default(size=CAPTION - 3)
        for k, line in enumerate(lines):
            colour = (0, 110, 0) if k == 1 else (180, 0, 0) if k == 2 else (60, 60, 60)
            draw.text((2, view.height + 2 + CAPTION * k), line[: view.width // 6], fill=colour, font=font)
        return out
