"""Named model presets, registered once. `create_model` in `cae2.model` builds them."""

from __future__ import annotations

import dataclasses
from typing import Any

from cae2.config import ModelConfig, Preset, TrainDefaults

_PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset
    return preset


def list_presets() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(_PRESETS)}") from None


def resolve_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's ModelConfig with `overrides` applied; unknown override names fail loudly."""
    cfg = get_preset(name).model
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown} for {name!r}; known: {sorted(known)}")
    return dataclasses.replace(cfg, **overrides)


# ViT-Tiny and ViT-Small use 12 heads (official code), not timm's 3 and 6.
register(Preset(
    name="cae2_vit_tiny",
    description="ViT-Tiny/16 (5.7M), regressor 1x96 with encoder->regressor projection, 30/196 masked",
    model=ModelConfig(embed_dim=192, depth=12, num_heads=12, drop_path=0.1,
                      regressor_depth=1, regressor_dim=96, regressor_heads=12, num_masked_196=30),
))
register(Preset(
    name="cae2_vit_small",
    description="ViT-Small/16 (22M), regressor 1x384, 49/196 masked",
    model=ModelConfig(embed_dim=384, depth=12, num_heads=12, drop_path=0.1,
                      regressor_depth=1, regressor_dim=384, regressor_heads=12, num_masked_196=49),
))
register(Preset(
    name="cae2_vit_base",
    description="ViT-Base/16 (86M), regressor 4x768, 98/196 masked",
    model=ModelConfig(embed_dim=768, depth=12, num_heads=12, drop_path=0.1,
                      regressor_depth=4, regressor_dim=768, regressor_heads=12, num_masked_196=98),
))
register(Preset(
    name="cae2_vit_large",
    description="ViT-Large/16 (304M), regressor 4x1024, 118/196 masked, CLIP ViT-L/14 targets (768-d)",
    model=ModelConfig(embed_dim=1024, depth=24, num_heads=16, drop_path=0.2,
                      regressor_depth=4, regressor_dim=1024, regressor_heads=16, num_masked_196=118,
                      target_dim=768),
))
register(Preset(
    name="cae2_debug",
    description="64 px, 4x4 grid, 32-d targets: pairs with the cae2-tiny-clip teacher for tests and the demo",
    model=ModelConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, drop_path=0.1,
                      regressor_depth=1, regressor_dim=16, regressor_heads=2, num_masked_196=98, target_dim=32),
    train=TrainDefaults(warmup_epochs=1, epochs=10),
))
