"""Latent alignment losses (CAE v2, Sec. 3): visible l_v over CLS + visible tokens, masked l_z.

Predictions and targets are L2-normalised per token first (both the paper and the code do so).
`combine=tokens` is the official code: one `cosine_embedding_loss` averaged over every supervised
token, i.e. l_v and l_z weighted by their token counts; `sum` is the paper's l_v + l_z.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from cae2.config import LossCombine, LossKind


class AlignmentLoss(NamedTuple):
    loss: torch.Tensor
    loss_v: torch.Tensor
    loss_z: torch.Tensor


def token_distance(pred: torch.Tensor, target: torch.Tensor, kind: LossKind) -> torch.Tensor:
    """[B, T, D_t] x2 -> per-token distance [B, T] between L2-normalised vectors (float32)."""
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    if kind == LossKind.cosine:
        return 1.0 - (p * t).sum(-1)
    if kind == LossKind.mse:
        return (p - t).pow(2).mean(-1)
    if kind == LossKind.smooth_l1:
        return F.smooth_l1_loss(p, t, reduction="none").mean(-1)
    raise ValueError(f"unknown loss kind {kind!r}")


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, num_visible: int,
                   kind: LossKind = LossKind.cosine, combine: LossCombine = LossCombine.tokens) -> AlignmentLoss:
    """pred: [B, T_p, D_t], target: [B, 1 + N, D_t], both ordered [CLS, visible, masked].

    num_visible counts CLS + visible tokens. pred may stop after the visible part (regressor
    depth 0); then l_z is 0 and only l_v is trained.
    """
    if pred.shape[1] < num_visible or pred.shape[1] > target.shape[1]:
        raise ValueError(f"prediction has {pred.shape[1]} tokens; expected {num_visible}..{target.shape[1]}")
    d = token_distance(pred, target[:, : pred.shape[1]], kind)  # [B, T_p]
    d_v, d_z = d[:, :num_visible], d[:, num_visible:]
    loss_v = d_v.mean()
    if d_z.shape[1] == 0:
        return AlignmentLoss(loss_v, loss_v, torch.zeros_like(loss_v))
    loss_z = d_z.mean()
    if combine == LossCombine.tokens:
        loss = d.mean()
    elif combine == LossCombine.sum:
        loss = loss_v + loss_z
    elif combine == LossCombine.visible:
        loss = loss_v
    elif combine == LossCombine.masked:
        loss = loss_z
    else:
        raise ValueError(f"unknown loss combination {combine!r}")
    return AlignmentLoss(loss, loss_v, loss_z)
