"""The encoders `cae2 evaluate` measures, from one spec each:

    RUN_DIR or CHECKPOINT_DIR      a cae2 run's newest complete checkpoint (its encoder)
    FILE.safetensors               an encoder exported by `cae2 export`
    timm:NAME[:random]             a timm model, pretrained weights from the local cache (or random)
    clip:NAME:TAG|FILE|none        the CLIP teacher tower, the reference a student aims at

Every one gives the features the anchors probe, from one forward on the whole image: the CLS token
after the final norm ("cls") and the mean of the patch tokens ("avg"); for CLIP, its projected
latents, the CAE v2 targets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cae2.config import IMAGENET_MEAN, IMAGENET_STD, rgb
from cae2.encoder import timm_kwargs
from cae2.errors import UserError
from pipelines.checkpoint import read_state
from pipelines.weights import find_checkpoint, local_source, model_config_of, model_state_dict
from targets.teacher import MissingWeights, Teacher, TeacherSpec
from targets.views import normalize


@dataclass
class FeatureModel:
    net: Any
    """A timm VisionTransformer or a `targets.teacher.Teacher` (by `kind`)."""
    kind: str
    """vit (timm VisionTransformer) or clip (targets.teacher.Teacher)."""
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    sha256: str
    """Of the weights (state dict bytes in key order)."""

    def to(self, device) -> FeatureModel:
        self.net = self.net.to(device).eval()
        if self.kind == "clip":
            self.net.device = torch.device(device)  # the teacher moves its inputs there
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def features(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """uint8 [B, 3, S, S] -> float32 [B, D] (cls+avg: [B, 2D])."""
        x = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
        if self.kind == "clip":
            tokens, prefix = self.net(x), 1
        else:
            tokens, prefix = self.net.forward_features(x), self.net.num_prefix_tokens
        return pool_tokens(tokens.float(), prefix, pool)


def pool_tokens(tokens: torch.Tensor, prefix: int, pool: str) -> torch.Tensor:
    cls, avg = tokens[:, 0], tokens[:, prefix:].mean(1)
    return {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], dim=-1)}[pool]


def state_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _vit(kwargs: dict, state: dict, source: str) -> FeatureModel:
    return _timm_net(VisionTransformer(**kwargs), state, int(kwargs["img_size"]), source)


def _timm_net(net: nn.Module, state: dict, img_size: int, source: str) -> FeatureModel:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"--model {source}: the weights do not fit the model it describes ({first})") from None
    return FeatureModel(net.eval(), "vit", img_size, IMAGENET_MEAN, IMAGENET_STD, source,
                        state_sha256(net))


def load_feature_model(spec: str, seed: int = 0, quick_gelu: bool | None = None,
                       download: bool = False) -> FeatureModel:
    """The model a `--model` spec names; `seed` initialises random weights (timm:NAME:random, clip:M:none)."""
    if spec.startswith("timm:"):
        return _timm(spec, seed)
    if spec.startswith("clip:"):
        return _clip(spec, seed, quick_gelu, download)
    path = local_source(spec)
    if path.suffix == ".safetensors":
        return _exported(path, spec)
    if path.is_dir():
        ckpt = find_checkpoint(path)
        trainer = read_state(ckpt)
        if trainer.get("kind") == "finetune":  # a fine-tuning run: its network's features, without the head
            return _beit_features(trainer["timm_model"]["kwargs"], model_state_dict(ckpt), spec)
        return _vit(timm_kwargs(model_config_of(ckpt)), model_state_dict(ckpt, "encoder."), spec)
    raise UserError(f"--model {spec}: not a run or checkpoint directory, an exported .safetensors file, "
                    "timm:NAME or clip:NAME:WEIGHTS")


def _exported(path: Path, spec: str) -> FeatureModel:
    if not path.is_file():
        raise UserError(f"--model {spec}: no such file")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "timm_kwargs" not in meta:
        raise UserError(f"--model {spec}: not an encoder exported by `cae2 export` (no timm_kwargs metadata)")
    kwargs = json.loads(meta["timm_kwargs"])
    if meta.get("timm_class") == "Beit":  # a fine-tuned network: its features without the head
        return _beit_features(kwargs, load_file(str(path)), spec)
    return _vit(kwargs, load_file(str(path)), spec)


def _beit_features(kwargs: dict, state: dict, spec: str) -> FeatureModel:
    kwargs = kwargs | {"num_classes": 0}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return _timm_net(Beit(**kwargs), state, int(kwargs["img_size"]), spec)


def timm_model(spec: str, seed: int) -> Any:
    """The headless timm model of a timm:NAME[:random] spec; random weights drawn from `seed`, so that a
    random baseline is the same in every run of one --seed."""
    name, _, mode = spec.removeprefix("timm:").partition(":")
    if mode not in ("", "random"):
        raise UserError(f"--model {spec}: use timm:NAME (pretrained weights) or timm:NAME:random")
    if not timm.is_model(name):
        raise UserError(f"--model {spec}: timm has no model {name!r} (timm.list_models() lists them)")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(name, pretrained=mode != "random", num_classes=0)
    except Exception as e:  # noqa: BLE001 - a missing download has many exception types
        raise UserError(f"--model {spec}: pretrained weights of {name} cannot be loaded ({type(e).__name__}); put "
                        f"them in the Hugging Face cache, or ask for timm:{name}:random") from None


def _timm(spec: str, seed: int) -> FeatureModel:
    net = timm_model(spec, seed)
    cfg = net.pretrained_cfg or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return FeatureModel(net.eval(), "vit", size, rgb(cfg.get("mean", IMAGENET_MEAN)), rgb(cfg.get("std", IMAGENET_STD)),
                        spec, state_sha256(net))


def _clip(spec: str, seed: int, quick_gelu: bool | None, download: bool) -> FeatureModel:
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise UserError(f"--model {spec}: use clip:MODEL:WEIGHTS, e.g. clip:ViT-B-16:openai or clip:ViT-B-16:/w.pt "
                        "(clip:MODEL:none for random weights)")
    try:
        teacher = Teacher(TeacherSpec(name=parts[1], pretrained=parts[2], quick_gelu=quick_gelu, init_seed=seed),
                          allow_download=download)
    except MissingWeights as e:
        raise UserError(f"--model {spec}: CLIP weights {e.model}/{e.tag} {e.where()}; use clip:{parts[1]}:/path/to/"
                        f"weights{'' if download else ', or add --download'}") from None
    return FeatureModel(teacher, "clip", teacher.image_size, teacher.mean, teacher.std, spec,
                        teacher.weights_sha256 or state_sha256(teacher.visual))
