"""Fine-tuning data: the epoch plan, and timm's augmentations with every random draw keyed.

Each epoch is a permutation drawn from (seed, epoch). Step s takes the next `global_batch` images of it,
cut into micro-batches of `batch_size`; micro-batch j of the step goes to rank j % W as its (j // W)-th
micro-batch. So W ranks with A micro-batches each see exactly the batches one rank sees with W x A:
the same images, the same augmentations (keyed by seed, epoch and image), the same Mixup/CutMix draws
(keyed by seed, epoch, step and micro-batch). The position in an epoch is a number of micro-batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from torch.utils.data import Dataset

from cae2.errors import UserError
from pipelines.evaluate.data import LabelledImages

ORDER_SALT = "finetune-order"


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits as Pillow before 11 did it (a black image) instead of an error: the
    authors' RandAugment (rand-m9-mstd0.5-inc1) asks for 0 bits above magnitude 7.5."""
    if bits_to_keep >= 8:
        return img
    return img.point(lambda _: 0) if bits_to_keep <= 0 else ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = _posterize


def key_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:4], "little")


@contextlib.contextmanager
def keyed(*parts):
    """Python's, numpy's and torch's global generators seeded by `parts` inside, restored after (timm's
    transforms and Mixup draw from them)."""
    seed = key_seed(*parts)
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@dataclass(frozen=True)
class FinetunePlan:
    samples: int
    world: int
    batch_size: int
    global_batch: int

    def __post_init__(self) -> None:
        if self.global_batch % (self.batch_size * self.world):
            raise UserError(f"--global-batch {self.global_batch} is not a multiple of --batch-size {self.batch_size} "
                            f"x {self.world} process(es); pick a global batch they divide")
        if self.steps_per_epoch < 1:
            raise UserError(f"--train has {self.samples} images, fewer than one global batch of {self.global_batch}; "
                            "lower --global-batch")

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.batch_size * self.world)

    @property
    def steps_per_epoch(self) -> int:
        return self.samples // self.global_batch

    def rank_indices(self, seed: int, epoch: int, rank: int) -> np.ndarray:
        """The images of one rank in one epoch, micro-batch after micro-batch."""
        order = np.random.default_rng([key_seed(ORDER_SALT, seed), epoch]).permutation(self.samples)
        steps = order[:self.steps_per_epoch * self.global_batch].reshape(self.steps_per_epoch, -1, self.batch_size)
        return steps[:, rank::self.world].reshape(-1)

    def micro_batch(self, position: int, rank: int) -> tuple[int, int]:
        """(step in the epoch, micro-batch index within the step) of a rank's `position`-th micro-batch."""
        step, m = divmod(position, self.grad_accum)
        return step, m * self.world + rank


class AugmentedImages(Dataset):
    """Training images through a timm transform whose random draws are keyed by (seed, epoch, image)."""

    def __init__(self, data: LabelledImages, transform, seed: int):
        self.data, self.transform, self.seed, self.epoch = data, transform, seed, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image = self.data.decode(i)
        with keyed("finetune-view", self.seed, self.epoch, i):
            return self.transform(image), int(self.data.labels[i]), i


class EvalImages(Dataset):
    """Validation images through timm's evaluation transform (resize, center crop: no random draws)."""

    def __init__(self, data: LabelledImages, transform):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.decode(i)), int(self.data.labels[i]), i
