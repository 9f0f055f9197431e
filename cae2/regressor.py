"""Latent contextual regressor: predicts masked-patch latents from the visible latents.

Reproduces `RegressorBlock` / `CrossAttention` / `LatentRegresser` of the official code (CAE v2):
    x = x_q + DropPath(g1 * CA(q=LN_q(x_q + pos_q), k=LN_k(x_kv + pos_kv), v=LN_v(x_kv)))
    x = LN2(x)
    x = x + DropPath(g2 * MLP(x))
with keys/values = concat(visible latents, current masked states) and no final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.drop import DropPath
from timm.layers.mlp import Mlp
from torch import nn


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys/values; q, k, v without bias except the
    learnable q and v biases (no k bias, as in the official code)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, N_q, C]; k, v: [B, N_kv, C] -> [B, N_q, C]."""
        B, Nq, C = q.shape
        h = self.num_heads
        q = F.linear(q, self.q.weight, self.q_bias).reshape(B, Nq, h, -1).transpose(1, 2)
        k = F.linear(k, self.k.weight).reshape(B, k.shape[1], h, -1).transpose(1, 2)
        v = F.linear(v, self.v.weight, self.v_bias).reshape(B, v.shape[1], h, -1).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, h, N_q, C/h]
        return self.proj(x.transpose(1, 2).reshape(B, Nq, C))


class RegressorBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale_init: float, drop_path: float):
        super().__init__()
        self.norm1_q = _norm(dim)
        self.norm1_k = _norm(dim)
        self.norm1_v = _norm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = _norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, pos_q: torch.Tensor, pos_kv: torch.Tensor) -> torch.Tensor:
        """x_q: [B, N_mask, C] masked states; x_kv: [B, N_vis + N_mask, C]; pos_*: matching shapes."""
        attn = self.cross_attn(self.norm1_q(x_q + pos_q), self.norm1_k(x_kv + pos_kv), self.norm1_v(x_kv))
        x = x_q + self.drop_path(self.gamma_1 * attn)
        x = self.norm2(x)
        return x + self.drop_path(self.gamma_2 * self.mlp(x))


class LatentContextualRegressor(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, layer_scale_init: float,
                 drop_path: float):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, drop_path, depth)
        self.blocks = nn.ModuleList(
            RegressorBlock(dim, num_heads, mlp_ratio, layer_scale_init, rate) for rate in rates
        )

    def forward(self, x_masked: torch.Tensor, z_visible: torch.Tensor, pos_masked: torch.Tensor,
                pos_visible: torch.Tensor) -> torch.Tensor:
        """x_masked: [B, N_mask, C] (mask tokens); z_visible: [B, N_vis, C] -> [B, N_mask, C]."""
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)
        for blk in self.blocks:
            x_masked = blk(x_masked, torch.cat([z_visible, x_masked], dim=1), pos_masked, pos_kv)
        return x_masked
