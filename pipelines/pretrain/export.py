"""`cae2 export`: the pretrained encoder as a timm `VisionTransformer` state dict (safetensors)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from safetensors import SafetensorError
from safetensors.torch import save_file

import cae2
from cae2.config import ModelConfig
from cae2.encoder import timm_kwargs
from cae2.errors import UserError
from cae2.fields import Argument, PathKind
from pipelines.checkpoint import read_state
from pipelines.files import follow_umask
from pipelines.run_dirs import shown
from pipelines.weights import beit_metadata, find_checkpoint, model_config_of, model_state_dict
from targets.storage import Location
from targets.storage_settings import StorageSettings


@dataclass(kw_only=True)
class ExportConfig(StorageSettings):
    """Every option of `cae2 export`."""

    checkpoint: Annotated[str, Argument(), PathKind("dir")]
    """A checkpoint dir, or a run dir (its newest checkpoint); local or s3://...."""
    out: Annotated[str, PathKind("new_file")] = "encoder.safetensors"
    """Output .safetensors file (local or s3://...)."""


TIMM_NAMES = {(192, 12): "vit_tiny_patch16_224", (384, 12): "vit_small_patch16_224",
              (768, 12): "vit_base_patch16_224", (1024, 24): "vit_large_patch16_224"}


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


def export_encoder(src: str | Path, out: str | Path) -> tuple[Path, str]:
    """The encoder of a pretraining run, or the whole network of a fine-tuning run (`cae2 evaluate
    finetune`), as timm weights in one .safetensors -> (checkpoint, the Python that loads it)."""
    ckpt = find_checkpoint(src)
    trainer = read_state(ckpt)
    if trainer.get("kind") == "finetune":
        kwargs = trainer["timm_model"]["kwargs"]
        state, meta = model_state_dict(ckpt), beit_metadata(kwargs, trainer["classes"])
        call = (f"import timm, safetensors.torch\nmodel = timm.models.beit.Beit(**{kwargs!r})\n"
                f'model.load_state_dict(safetensors.torch.load_file("{out}"), strict=True)')
    else:
        cfg = model_config_of(ckpt)
        state, call = model_state_dict(ckpt, "encoder."), timm_call(cfg, str(out))
        meta = {"format": "timm.VisionTransformer", "timm_kwargs": json.dumps(timm_kwargs(cfg))}
    _write(state, meta | {"source_checkpoint": shown(ckpt), "cae2_version": cae2.__version__}, out)
    return ckpt, call


def _write(state: dict, meta: dict, out: str | Path) -> None:
    """The .safetensors file, whole: through a temporary name beside it, or uploaded (an object store)."""
    where = Location.of(out)
    staging = Path(tempfile.mkdtemp(prefix="cae2-export-")) if where.remote else None
    target = staging / where.name if staging else where.path
    tmp = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata=meta)
        follow_umask([tmp])
        tmp.replace(target)
        if staging:
            where.upload(target)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--out {out} cannot be written ({getattr(e, 'strerror', None) or e}); pass a file path in "
                        "a writable folder") from None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def load_model(src: str | Path) -> cae2.CAEv2:
    """The whole student (encoder, regressor, head) of a checkpoint or a run dir's newest one."""
    ckpt = find_checkpoint(src)
    model = cae2.CAEv2(model_config_of(ckpt))
    model.load_state_dict(model_state_dict(ckpt), strict=True)
    return model
