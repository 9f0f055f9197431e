"""ViT encoder over the visible patches; its state dict is a timm `VisionTransformer` state dict."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cae2.config import ModelConfig
from cae2.pos_embed import sincos_pos_embed_2d


def timm_kwargs(cfg: ModelConfig) -> dict:
    """Arguments of the timm `VisionTransformer` whose state dict equals the encoder's."""
    return dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        init_values=cfg.layer_scale_init,
        class_token=True,
        global_pool="token",
        num_classes=0,
    )


class Encoder(VisionTransformer):
    """timm ViT with fixed sin-cos position embeddings and a visible-patches-only forward.

    The official attention has learnable q and v biases and no k bias; timm's fused qkv has a k bias
    too. A key bias adds the same logit to every key of a query, so softmax cancels it: it gets no
    gradient and changes no output. Everything else (pre-norm blocks, layer scale, final norm,
    LayerNorm eps 1e-6) matches the official encoder.
    """

    pos_embed: nn.Parameter  # timm makes both (class token, learned-style embedding filled with sin-cos here)
    cls_token: nn.Parameter

    def __init__(self, cfg: ModelConfig):
        super().__init__(**timm_kwargs(cfg), drop_path_rate=cfg.drop_path, weight_init="skip")
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(cfg.embed_dim, cfg.grid_size, cls_token=True))
        self.pos_embed.requires_grad_(False)

    def encode_visible(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W]; mask: [B, N] bool, True = masked, the same count in every row.

        Returns the normed latents of CLS + visible patches in raster order: [B, 1 + N_vis, D].
        """
        x = self.patch_embed(images)  # [B, N, D]
        B, N, D = x.shape
        x = x + self.pos_embed[:, 1:]
        x = x[~mask].reshape(B, -1, D)  # [B, N_vis, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.blocks(x)
        return self.norm(x)
