"""TensorBoard pictures of training: every `--image-every` steps, for a few fixed samples (the first of the
first batch this process trains on), the view, its mask, the teacher's target latents and the student's
predictions for the masked patches as PCA-to-RGB maps in one colour basis (fitted once, on these samples'
targets, so the pictures of step 1,000 and step 100,000 compare), and histograms of the token cosines between
predictions and targets, visible and masked apart."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import cae2
from cae2.config import IMAGENET_MEAN, IMAGENET_STD
from pipelines.pictures import PcaBasis, enlarge, only_masked, pixels, sheet, view_image, with_mask

SAMPLES = 4
DEFAULT_EVERY = 1000
"""--image-every when it is not given, for runs of at least LONG_RUN steps (shorter runs: off)."""
LONG_RUN = 5000


def image_every(option: int | None, total_steps: int) -> int:
    if option is not None:
        return option
    return DEFAULT_EVERY if total_steps >= LONG_RUN else 0


class Snapshots:
    """Keeps the fixed samples (`keep`, from the first batch) and writes their pictures (`write`)."""

    def __init__(self, every: int, grid: tuple[int, int], n_visible: int):
        self.every, self.grid, self.n_visible = every, grid, n_visible
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.basis: PcaBasis | None = None

    def keep(self, images: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> None:
        if self.inputs is None:
            self.inputs = (images[:SAMPLES].detach().clone(), mask[:SAMPLES].clone(),
                           targets[:SAMPLES].detach().float().clone())

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and self.inputs is not None

    @torch.no_grad()
    def write(self, model: torch.nn.Module, writer, step: int) -> None:
        """model: the plain module (not a DDP or compiled wrapper: this runs on the main process only)."""
        assert self.inputs is not None
        images, mask, targets = self.inputs
        was_training = model.training
        model.eval()
        try:
            pred = model(images, mask).float()
        finally:
            model.train(was_training)
        patches = targets[:, 1:]
        if self.basis is None:
            self.basis = PcaBasis.fit(patches.reshape(-1, patches.shape[-1]))
        predicted = self._in_grid_order(pred, mask)
        size = images.shape[-1]
        for i in range(images.shape[0]):
            view = view_image(pixels(images[i], IMAGENET_MEAN, IMAGENET_STD))
            m = mask[i].reshape(self.grid).cpu().numpy()
            target_map = self.basis.rgb(patches[i], self.grid)
            row: list = [view, with_mask(view, m), enlarge(target_map, size)]
            if predicted is not None:
                row.append(enlarge(only_masked(self.basis.rgb(predicted[i], self.grid), m), size))
            writer.add_image(f"samples/{i}", np.asarray(sheet([row], size)), step, dataformats="HWC")
        arranged = cae2.CAEv2.arrange_targets(targets, mask)[:, : pred.shape[1]]
        cos = F.cosine_similarity(pred, arranged, dim=-1)
        writer.add_histogram("token_cosine/visible", cos[:, 1:self.n_visible].cpu(), step)
        if pred.shape[1] > self.n_visible:
            writer.add_histogram("token_cosine/masked", cos[:, self.n_visible:].cpu(), step)

    def _in_grid_order(self, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Predictions [B, CLS + visible + masked, D] -> [B, N, D] in grid order (None: no regressor)."""
        if pred.shape[1] <= self.n_visible:
            return None
        B, N = mask.shape
        out = torch.zeros(B, N, pred.shape[-1], device=pred.device)
        out[~mask] = pred[:, 1:self.n_visible].reshape(-1, pred.shape[-1])
        out[mask] = pred[:, self.n_visible:].reshape(-1, pred.shape[-1])
        return out
