import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import cae2
from cae2.encoder import timm_kwargs
from tests.conftest import ALL_PRESETS, SMALL_PRESETS


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, cfg.img_size, cfg.img_size, generator=g)
    gen = cae2.create_mask_generator(cfg)
    import numpy as np

    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(b)]))
    return images, mask


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_encoder_is_a_timm_vit(name):
    model = cae2.create_model(name).eval()
    cfg = model.cfg
    vit = VisionTransformer(**timm_kwargs(cfg)).eval()
    vit.load_state_dict(model.encoder.state_dict(), strict=True)
    images, _ = _batch(cfg)
    visible = torch.zeros(2, cfg.num_patches, dtype=torch.bool)
    with torch.no_grad():
        ours = model.encode_visible(images, visible)
        ref = vit.forward_features(images)
    assert ours.shape == (2, 1 + cfg.num_patches, cfg.embed_dim)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_encoder_uses_fixed_sincos_positions():
    model = cae2.create_model("cae2_vit_tiny")
    pos = model.encoder.pos_embed
    assert not pos.requires_grad
    assert torch.all(pos[0, 0] == 0)
    # row 0, col 0 patch: sin(0)=0, cos(0)=1 on both halves
    q = model.cfg.embed_dim // 4
    assert torch.allclose(pos[0, 1, :q], torch.zeros(q)) and torch.allclose(pos[0, 1, q:2 * q], torch.ones(q))
    # moving one column changes only the column half
    assert torch.equal(pos[0, 1, : 2 * q], pos[0, 2, : 2 * q]) and not torch.equal(pos[0, 1, 2 * q:], pos[0, 2, 2 * q:])


def test_unknown_preset_and_override_fail_loudly():
    with pytest.raises(KeyError, match="unknown model 'vit_huge'"):
        cae2.create_model("vit_huge")
    with pytest.raises(TypeError, match="unknown model option"):
        cae2.create_model("cae2_debug", embed_dims=3)
    assert cae2.create_model("cae2_debug", target_dim=768).head[1].out_features == 768


def test_official_init():
    model = cae2.create_model("cae2_vit_small")
    w = model.regressor.blocks[0].cross_attn.q.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform bound
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.mask_token.abs().max() <= 0.02 + 1e-7 and model.encoder.cls_token.abs().max() <= 0.02 + 1e-7
    assert torch.all(model.encoder.blocks[0].ls1.gamma == 0.1) and torch.all(model.regressor.blocks[0].gamma_1 == 0.1)


def test_masked_prediction_invariant_to_visible_permutation():
    torch.manual_seed(0)
    model = cae2.create_model("cae2_vit_small", depth=2).eval()
    cfg = model.cfg
    images, mask = _batch(cfg, b=1)
    with torch.no_grad():
        z = model.encoder_to_regressor(model.encode_visible(images, mask))
        pos = model.regressor_pos_embed
        pos_v, pos_m = pos[~mask].reshape(1, -1, cfg.regressor_dim), pos[mask].reshape(1, -1, cfg.regressor_dim)
        q = model.mask_token.expand(1, pos_m.shape[1], -1)
        out = model.regressor(q, z[:, 1:], pos_m, pos_v)
        perm = torch.randperm(z.shape[1] - 1)
        out_perm = model.regressor(q, z[:, 1:][:, perm], pos_m, pos_v[:, perm])
    assert torch.allclose(out, out_perm, atol=1e-5)
    # a position embedding on the visible keys does matter (the test can fail)
    with torch.no_grad():
        out_wrong = model.regressor(q, z[:, 1:][:, perm], pos_m, pos_v)
    assert not torch.allclose(out, out_wrong, atol=1e-4)


def test_masked_pixels_do_not_change_any_output():
    torch.manual_seed(0)
    model = cae2.create_model("cae2_vit_tiny", depth=2).eval()
    cfg = model.cfg
    images, mask = _batch(cfg, b=2)
    p = cfg.patch_size
    changed = images.clone()
    gh, gw = cfg.grid_size
    for b in range(2):
        for idx in mask[b].nonzero().flatten().tolist():
            r, c = divmod(idx, gw)
            changed[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.randn(3, p, p)
    with torch.no_grad():
        a, b_ = model(images, mask), model(changed, mask)
        assert torch.equal(a, b_)
        # a visible pixel change does change outputs
        vis = (~mask[0]).nonzero()[0].item()
        r, c = divmod(vis, gw)
        changed[0, :, r * p, c * p] += 5
        assert not torch.equal(a, model(changed, mask))


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_forward_backward_every_param_gets_gradient(name):
    torch.manual_seed(0)
    model = cae2.create_model(name, drop_path=0.0).train()  # drop path could skip a whole block at batch 2
    cfg = model.cfg
    images, mask = _batch(cfg)
    targets = torch.randn(2, 1 + cfg.num_patches, cfg.target_dim)
    pred = model(images, mask)
    assert pred.shape == targets.shape
    out = cae2.alignment_loss(pred, model.arrange_targets(targets, mask), cfg.num_visible_tokens)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", SMALL_PRESETS[:2])
def test_bf16_autocast_has_no_nan(name):
    torch.manual_seed(0)
    model = cae2.create_model(name).train()
    cfg = model.cfg
    images, mask = _batch(cfg, b=4)
    targets = torch.randn(4, 1 + cfg.num_patches, cfg.target_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(images, mask)
        out = cae2.alignment_loss(pred, model.arrange_targets(targets, mask), cfg.num_visible_tokens)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_regressor_depth_zero_trains_visible_only():
    model = cae2.create_model("cae2_debug", regressor_depth=0)
    cfg = model.cfg
    images, mask = _batch(cfg)
    pred = model(images, mask)
    n_vis = 1 + cfg.num_patches - cfg.num_masked
    assert pred.shape[1] == n_vis
    targets = model.arrange_targets(torch.randn(2, 1 + cfg.num_patches, cfg.target_dim), mask)
    out = cae2.alignment_loss(pred, targets, n_vis)
    assert out.loss_z.item() == 0 and torch.allclose(out.loss, out.loss_v)
    out.loss.backward()


def test_param_groups_no_decay_on_1d_and_biases():
    model = cae2.create_model("cae2_debug")
    decay, no_decay = model.param_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert "encoder.pos_embed" not in [names[id(p)] for g in (decay, no_decay) for p in g["params"]]
    decayed = {names[id(p)] for p in decay["params"]}
    assert "encoder.cls_token" in decayed and "mask_token" in decayed  # the official code decays them
    _, nd = model.param_groups(0.05, decay_tokens=False)
    assert "mask_token" in {names[id(p)] for p in nd["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
