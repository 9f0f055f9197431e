"""`cae2 export`: the pretrained encoder as a timm `VisionTransformer` state dict (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import cae2
from cae2.config import ModelConfig
from cae2.encoder import timm_kwargs
from cae2.errors import UserError
from pipelines.checkpoint import MARKER, latest_checkpoint, read_state

TIMM_NAMES = {(192, 12): "vit_tiny_patch16_224", (384, 12): "vit_small_patch16_224",
              (768, 12): "vit_base_patch16_224", (1024, 24): "vit_large_patch16_224"}


def find_checkpoint(path: Path) -> Path:
    if (path / MARKER).is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"{path} is neither a complete checkpoint nor a run dir with one")
    return ckpt


def model_config_of(ckpt: Path) -> ModelConfig:
    raw = dict(read_state(ckpt)["model_config"])
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def encoder_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint {ckpt} has no model.safetensors")
    state = load_file(str(weights))
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        if k.startswith("encoder."):
            out[k.removeprefix("encoder.")] = v.contiguous()
    if not out:
        raise UserError(f"checkpoint {ckpt}: no encoder weights in model.safetensors")
    return out


def timm_call(cfg: ModelConfig, file: str) -> str:
    kwargs = timm_kwargs(cfg)
    name = TIMM_NAMES.get((cfg.embed_dim, cfg.depth))
    if name and cfg.img_size == 224 and cfg.patch_size == 16:
        extra = {k: kwargs[k] for k in ("num_heads", "init_values", "num_classes")}
        args = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        build = f'model = timm.create_model("{name}", pretrained=False, {args})'
    else:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        build = f"model = timm.models.VisionTransformer({args})"
    return (f"import timm, safetensors.torch\n{build}\n"
            f'model.load_state_dict(safetensors.torch.load_file("{file}"), strict=True)')


def export_encoder(src: Path, out: Path) -> tuple[Path, str]:
    ckpt = find_checkpoint(src)
    cfg = model_config_of(ckpt)
    state = encoder_state_dict(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "timm.VisionTransformer", "timm_kwargs": json.dumps(timm_kwargs(cfg)),
            "source_checkpoint": str(ckpt), "cae2_version": cae2.__version__}
    save_file(state, str(out), metadata=meta)
    return ckpt, timm_call(cfg, str(out))


def load_model(src: Path) -> cae2.CAEv2:
    """The whole student (encoder, regressor, head) of a checkpoint or a run dir's newest one."""
    ckpt = find_checkpoint(src)
    model = cae2.CAEv2(model_config_of(ckpt))
    state = {}
    for k, v in load_file(str(ckpt / "model.safetensors")).items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        state[k] = v
    model.load_state_dict(state, strict=True)
    return model
