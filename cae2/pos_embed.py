"""Fixed 2-D sin-cos position embeddings, as in the official CAE code."""

from __future__ import annotations

import torch


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool, temperature: float = 10000.0) -> torch.Tensor:
    """[1, (1 +) N, dim] embedding for an (h, w) patch grid in raster order.

    Reproduces `build_2d_sincos_position_embedding` of the official code: the first half of
    the channels encodes the patch row, the second half the column (the code builds its grid
    with `meshgrid(grid_w, grid_h)`, so its "w" half follows rows). The CLS slot is zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    quarter = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    out_r = rows.flatten()[:, None] * omega[None, :]  # [N, dim/4]
    out_c = cols.flatten()[:, None] * omega[None, :]
    emb = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)[None]  # [1, N, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, 1, dim), emb], dim=1)
    return emb
