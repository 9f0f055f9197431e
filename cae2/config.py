"""Typed configs: the model architecture and the pretraining defaults of each preset.

Numbers follow Table 7 of the CAE v2 paper and the authors' per-size scripts
(`Atten4Vis/CAE`, `project/CAEv2/scripts`). Where paper and code differ the code's
choice is the default and the paper's is an option (see docs/paper-vs-code.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


def rgb(values) -> tuple[float, float, float]:
    """Three per-channel values (a mean, a std) as a typed triple."""
    r, g, b = (float(v) for v in values)
    return r, g, b


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the student's input normalisation (the official code's)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MaskStrategy(StrEnum):
    block = "block"  # BEiT block-wise masking (default)
    random = "random"  # uniform random patches (ablation, Table 4)


class LossKind(StrEnum):
    cosine = "cosine"  # 1 - cos(pred, target) (default)
    mse = "mse"
    smooth_l1 = "smooth_l1"


class LossCombine(StrEnum):
    tokens = "tokens"  # official code: mean over all supervised tokens (CLS + visible + masked)
    sum = "sum"  # paper: l_v + l_z
    visible = "visible"  # ablation: l_v only
    masked = "masked"  # ablation: l_z only


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the student: ViT encoder, latent contextual regressor, shared head."""

    img_size: int = 224
    """Input resolution in pixels; the patch grid is img_size // patch_size per side."""
    patch_size: int = 16
    embed_dim: int
    """Encoder width."""
    depth: int
    """Encoder blocks."""
    num_heads: int
    mlp_ratio: float = 4.0
    layer_scale_init: float = 0.1
    """Initial value of the layer-scale gammas in encoder and regressor blocks."""
    drop_path: float
    """Stochastic depth rate, linearly increasing over encoder blocks (and regressor blocks)."""
    regressor_depth: int
    """Latent contextual regressor blocks; 0 trains with the visible loss only."""
    regressor_dim: int
    """Regressor width; a Linear+LayerNorm maps encoder outputs to it when it differs."""
    regressor_heads: int = 12
    num_masked_196: int
    """Masked patches per image on the 14x14 grid; scaled by area for other grids."""
    mask_strategy: MaskStrategy = MaskStrategy.block
    mask_min_block: int = 16
    """Smallest block of the block-wise generator, in patches."""
    target_dim: int = 512
    """Teacher latent dimension (512 for CLIP ViT-B/16, 768 for ViT-L/14)."""

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for name, dim, heads in (
            ("encoder", self.embed_dim, self.num_heads),
            ("regressor", self.regressor_dim, self.regressor_heads),
        ):
            if dim % heads:
                raise ValueError(f"{name} width {dim} is not divisible by its {heads} heads")
            if dim % 4:
                raise ValueError(f"{name} width {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
        if not 0 < self.num_masked_196 < 196:
            raise ValueError(f"num_masked_196 must be in 1..195, got {self.num_masked_196}")
        if self.regressor_depth < 0:
            raise ValueError("regressor_depth must be >= 0")

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def num_masked(self) -> int:
        """Masked patches per image on this config's grid (exact, the same for every image)."""
        n = round(self.num_masked_196 * self.num_patches / 196)
        return min(max(n, 1), self.num_patches - 1)

    @property
    def num_visible_tokens(self) -> int:
        """CLS + visible patches: the tokens the encoder sees and the visible loss l_v covers."""
        return 1 + self.num_patches - self.num_masked

    @property
    def mask_ratio(self) -> float:
        return self.num_masked / self.num_patches


@dataclass(frozen=True, kw_only=True)
class TrainDefaults:
    """Pretraining schedule defaults of a preset (Table 7 and the official scripts); `cae2 pretrain`
    reads these. The augmentation settings are the same for every preset and live with the views
    (`targets.views.ViewSettings`)."""

    lr: float = 1.5e-3
    """Peak learning rate at `lr_batch_ref` samples per optimizer step."""
    lr_batch_ref: int = 2048
    """Global batch at which `lr` applies; other batches scale it linearly (lr * B / lr_batch_ref)."""
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.05
    decay_tokens: bool = True
    """Official code applies weight decay to the CLS and mask tokens; False excludes them."""
    warmup_epochs: float = 10
    epochs: float = 300
    clip_grad: float = 3.0
    loss: LossKind = LossKind.cosine
    loss_combine: LossCombine = LossCombine.tokens


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainDefaults = field(default_factory=TrainDefaults)
