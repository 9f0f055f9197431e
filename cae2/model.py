"""CAE v2: encoder over visible patches, latent contextual regressor, shared head."""

from __future__ import annotations

import torch
from timm.layers.weight_init import trunc_normal_
from torch import nn

from cae2.config import ModelConfig
from cae2.encoder import Encoder
from cae2.pos_embed import sincos_pos_embed_2d
from cae2.presets import resolve_model_config
from cae2.regressor import LatentContextualRegressor

# Shape letters: B batch, N patches, N_vis visible, N_mask masked, D encoder width,
# C regressor width, D_t teacher dim.


def _official_trunc_normal_(t: torch.Tensor, std: float = 0.02) -> None:
    """The official code truncates at +-1 std (a=-std, b=std), not timm's default +-2."""
    trunc_normal_(t, std=std, a=-std, b=std)


class CAEv2(nn.Module):
    regressor_pos_embed: torch.Tensor  # a buffer: fixed sin-cos positions [1, N, C]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.regressor_dim
        self.encoder = Encoder(cfg)
        if cfg.embed_dim != C:
            self.encoder_to_regressor = nn.Sequential(nn.Linear(cfg.embed_dim, C), nn.LayerNorm(C, eps=1e-6))
        else:
            self.encoder_to_regressor = nn.Identity()
        self.register_buffer("regressor_pos_embed", sincos_pos_embed_2d(C, cfg.grid_size, cls_token=False),
                             persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, C), requires_grad=cfg.regressor_depth > 0)  # unused at 0
        self.regressor = LatentContextualRegressor(C, cfg.regressor_depth, cfg.regressor_heads, cfg.mlp_ratio,
                                                   cfg.layer_scale_init, cfg.drop_path)
        # Shared head: LayerNorm then Linear (the official code; the paper's text says FC then LN).
        self.head = nn.Sequential(nn.LayerNorm(C, eps=1e-6), nn.Linear(C, cfg.target_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        """Official init: every Linear xavier-uniform with zero bias, LayerNorms (1, 0), patch conv and
        CLS/mask tokens truncated-normal std .02, layer-scale gammas at `layer_scale_init`."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        conv = self.encoder.patch_embed.proj
        _official_trunc_normal_(conv.weight)
        nn.init.zeros_(conv.bias)
        _official_trunc_normal_(self.encoder.cls_token)
        _official_trunc_normal_(self.mask_token)

    # --- forward, in the paper's order -------------------------------------------------------

    def encode_visible(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W], [B, N] -> encoder latents of CLS + visible patches [B, 1 + N_vis, D]."""
        return self.encoder.encode_visible(images, mask)

    def regress_masked(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: [B, 1 + N_vis, C] (CLS first) -> predicted masked latents [B, N_mask, C].

        Keys and values are the visible patch latents (the CLS latent is not used) and the
        current masked states; position embeddings go on queries and keys only.
        """
        B, _, C = z.shape
        pos = self.regressor_pos_embed.expand(B, -1, -1)  # [B, N, C]
        pos_visible = pos[~mask].reshape(B, -1, C)
        pos_masked = pos[mask].reshape(B, -1, C)
        queries = self.mask_token.expand(B, pos_masked.shape[1], -1)
        return self.regressor(queries, z[:, 1:], pos_masked, pos_visible)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Shared head: [B, *, C] -> [B, *, D_t]."""
        return self.head(x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predictions for [CLS, visible (raster order), masked (raster order)]: [B, 1 + N, D_t].

        With regressor depth 0 only [B, 1 + N_vis, D_t] (the visible part) is returned.
        """
        z = self.encoder_to_regressor(self.encode_visible(images, mask))  # [B, 1 + N_vis, C]
        if self.cfg.regressor_depth == 0:
            return self.project(z)
        return self.project(torch.cat([z, self.regress_masked(z, mask)], dim=1))

    # --- optimizer metadata -----------------------------------------------------------------

    def no_weight_decay(self, decay_tokens: bool = True) -> set[str]:
        """Parameter names (beyond 1-D params and biases) excluded from weight decay."""
        names = {"encoder.pos_embed"}
        if not decay_tokens:
            names |= {"encoder.cls_token", "mask_token"}
        return names

    def param_groups(self, weight_decay: float, decay_tokens: bool = True) -> list[dict]:
        """AdamW groups: no decay on 1-D params (norms, layer scale, biases) and `no_weight_decay()`."""
        skip = self.no_weight_decay(decay_tokens)
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @staticmethod
    def arrange_targets(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Teacher tokens [B, 1 + N, D_t] in grid order -> [CLS, visible, masked] like `forward`."""
        B, _, Dt = targets.shape
        patches = targets[:, 1:]
        visible = patches[~mask].reshape(B, -1, Dt)
        masked = patches[mask].reshape(B, -1, Dt)
        return torch.cat([targets[:, :1], visible, masked], dim=1)


def create_model(name: str, **overrides) -> CAEv2:
    """Build a registered preset, e.g. `create_model("cae2_vit_base", target_dim=768)`."""
    return CAEv2(resolve_model_config(name, **overrides))
