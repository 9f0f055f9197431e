"""The network `cae2 evaluate finetune` trains: the source's ViT as timm's `Beit`, as the authors'
fine-tuning code builds it (models/modeling_finetune.py): the mean of the patch tokens, the encoder's
final norm moved after the pooling (`norm.` -> `fc_norm.`), the position embeddings of the source
(fixed sin-cos for a cae2 encoder), a zero-initialised relative position bias in every block, and a
new linear head (initialised small, scale 0.001)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.layers.pos_embed import resample_abs_pos_embed
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cae2.config import IMAGENET_MEAN, IMAGENET_STD, rgb
from cae2.encoder import timm_kwargs
from cae2.errors import UserError
from cae2.pos_embed import sincos_pos_embed_2d
from pipelines.checkpoint import read_state
from pipelines.evaluate.models import timm_model
from pipelines.weights import find_checkpoint, local_source, model_config_of, model_state_dict

VIT_ARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass
class SourceViT:
    """A ViT to fine-tune, as a timm VisionTransformer state dict and what describes it."""

    kwargs: dict
    state: dict
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sincos: bool
    """Fixed sin-cos position embeddings (a cae2 encoder), not trained."""

    @property
    def width(self) -> int:
        return int(self.kwargs["embed_dim"])


@dataclass
class FinetuneNet:
    net: nn.Module
    kwargs: dict
    """The Beit's constructor arguments (what an export records)."""
    source: SourceViT

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.source.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.source.std

    @property
    def width(self) -> int:
        return self.source.width


def load_source(spec: str, seed: int) -> SourceViT:
    """The ViT of a run dir, an exported encoder or a timm ViT."""
    if spec.startswith("clip:"):
        raise UserError(f"--model {spec}: fine-tuning takes a cae2 run or checkpoint dir, an exported encoder or "
                        "timm:NAME[:random]; a CLIP tower is the teacher, measured with knn or linear")
    if spec.startswith("timm:"):
        return _timm_vit(spec, seed)
    path = local_source(spec)
    if path.suffix == ".safetensors" and path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "timm_kwargs" not in meta or meta.get("timm_class", "VisionTransformer") != "VisionTransformer":
            raise UserError(f"--model {spec}: not an encoder exported by `cae2 export` of a pretraining run")
        return SourceViT(json.loads(meta["timm_kwargs"]), load_file(str(path)), IMAGENET_MEAN, IMAGENET_STD, True)
    if path.is_dir():
        ckpt = find_checkpoint(path)
        if read_state(ckpt).get("kind") == "finetune":
            raise UserError(f"--model {spec} is a fine-tuning run; fine-tune from the pretraining run or encoder it "
                            "started from (knn and linear take a fine-tuning run)")
        return SourceViT(timm_kwargs(model_config_of(ckpt)), model_state_dict(ckpt, "encoder."), IMAGENET_MEAN,
                         IMAGENET_STD, True)
    raise UserError(f"--model {spec}: not a run or checkpoint directory, an exported .safetensors file or timm:NAME")


def _timm_vit(spec: str, seed: int) -> SourceViT:
    net = timm_model(spec, seed)
    if not isinstance(net, VisionTransformer) or net.num_prefix_tokens != 1:
        raise UserError(f"--model {spec}: not a ViT with one class token; fine-tuning takes ViTs")
    block: Any = net.blocks[0]  # timm's Block
    kwargs = {"img_size": net.patch_embed.img_size[0], "patch_size": net.patch_embed.patch_size[0],
              "embed_dim": net.embed_dim, "depth": len(net.blocks), "num_heads": block.attn.num_heads,
              "mlp_ratio": block.mlp.fc1.out_features / net.embed_dim,
              "init_values": 1.0 if isinstance(block.ls1, nn.Module) and hasattr(block.ls1, "gamma") else None}
    cfg: dict = getattr(net, "pretrained_cfg", None) or {}
    mean, std = rgb(cfg.get("mean", IMAGENET_MEAN)), rgb(cfg.get("std", IMAGENET_STD))
    return SourceViT(kwargs, net.state_dict(), mean, std, False)


def build(source: SourceViT, seed: int, num_classes: int, input_size: int, drop_path: float,
          rel_pos_bias: bool) -> FinetuneNet:
    """The fine-tuning network of a source ViT, its weights loaded (head and relative position bias new)."""
    vit, sincos = source.kwargs, source.sincos
    kwargs = {"img_size": input_size, **{k: vit[k] for k in VIT_ARGS}, "init_values": vit.get("init_values"),
              "num_classes": num_classes, "global_pool": "avg", "use_abs_pos_emb": True,
              "use_rel_pos_bias": rel_pos_bias, "drop_path_rate": drop_path, "head_init_scale": 0.001}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head's initialisation
        net = Beit(**kwargs)
    loaded = beit_state(source.state, net.patch_embed.grid_size, sincos, kwargs["embed_dim"])
    missing, unexpected = net.load_state_dict(loaded, strict=False)
    new = {k for k in missing if k.startswith("head.") or "relative_position" in k}
    if unexpected or set(missing) - new:
        raise UserError(f"--model: its weights do not fit a ViT fine-tuning network (missing "
                        f"{sorted(set(missing) - new)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if sincos and net.pos_embed is not None:
        net.pos_embed.requires_grad_(False)
    return FinetuneNet(net, kwargs, source)


def beit_state(vit: dict, grid: tuple[int, int], sincos: bool, dim: int) -> dict:
    """A timm VisionTransformer state dict as timm Beit's: q and v biases (a key bias changes no attention
    output), layer scales as gamma_1/2, the final norm after the pooling, position embeddings on `grid`."""
    out = {}
    for k, v in vit.items():
        if k.endswith(".attn.qkv.bias"):
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = v[:dim], v[2 * dim:]
            continue
        k = k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        out["fc_norm." + k.removeprefix("norm.") if k.startswith("norm.") else k] = v
    out.pop("head.weight", None)
    out.pop("head.bias", None)
    if sincos:
        out["pos_embed"] = sincos_pos_embed_2d(dim, grid, cls_token=True)
    else:
        out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], list(grid), num_prefix_tokens=1)
    return out
