import pytest
import torch
import torch.nn.functional as F

from cae2 import LossCombine, LossKind, alignment_loss


def _official(pred, target):
    """The official loss: cosine_embedding_loss over concatenated L2-normalised tokens."""
    pred = pred / pred.norm(dim=-1, keepdim=True)
    target = target / target.norm(dim=-1, keepdim=True)
    C = pred.shape[-1]
    ones = torch.ones(pred.shape[0] * pred.shape[1])
    return F.cosine_embedding_loss(pred.reshape(-1, C), target.reshape(-1, C), ones)


def test_hand_sized_example_matches_official_formula():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], [[3.0, 4.0], [-1.0, 0.0], [1.0, -1.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], [[4.0, 3.0], [1.0, 0.0], [1.0, 1.0]]])
    out = alignment_loss(pred, target, num_visible=2)
    # per-token 1 - cos by hand: [0, 1 - 1/sqrt2, 2], [1 - 24/25, 2, 1]
    d = torch.tensor([[0.0, 1 - 2 ** -0.5, 2.0], [1 - 24 / 25, 2.0, 1.0]])
    assert torch.allclose(out.loss, d.mean())
    assert torch.allclose(out.loss, _official(pred, target))
    assert torch.allclose(out.loss_v, d[:, :2].mean()) and torch.allclose(out.loss_z, d[:, 2:].mean())
    paper = alignment_loss(pred, target, 2, combine=LossCombine.sum)
    assert torch.allclose(paper.loss, d[:, :2].mean() + d[:, 2:].mean())
    assert torch.allclose(alignment_loss(pred, target, 2, combine=LossCombine.visible).loss, d[:, :2].mean())
    assert torch.allclose(alignment_loss(pred, target, 2, combine=LossCombine.masked).loss, d[:, 2:].mean())


def test_random_tokens_match_official():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 17, 32), torch.randn(4, 17, 32) * 3
    assert torch.allclose(alignment_loss(pred, target, 9).loss, _official(pred, target), atol=1e-6)


@pytest.mark.parametrize("kind", list(LossKind))
def test_identical_inputs_give_zero(kind):
    x = torch.randn(2, 5, 8)
    assert alignment_loss(x, x * 2.5, 3, kind=kind).loss.abs().item() < 1e-6


def test_orthogonal_gives_one():
    pred = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    target = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 2.0]]])
    assert alignment_loss(pred, target, 1).loss.item() == pytest.approx(1.0)


def test_mse_and_smooth_l1_are_distances_on_the_sphere():
    pred = torch.tensor([[[1.0, 0.0]]])
    target = torch.tensor([[[0.0, 3.0]]])
    assert alignment_loss(pred, target, 1, kind=LossKind.mse).loss.item() == pytest.approx(1.0)  # (1 + 1) / 2
    assert alignment_loss(pred, target, 1, kind=LossKind.smooth_l1).loss.item() == pytest.approx(0.5)
