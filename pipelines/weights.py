"""A run's weights for the commands that start from one (export, evaluate, finetune): its newest complete
checkpoint, the model it was, and the model's weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from cae2.config import ModelConfig
from cae2.errors import UserError
from pipelines.checkpoint import MARKER, WRAPPER_PREFIXES, latest_checkpoint, read_state
from pipelines.run_dirs import RunDir
from targets.local_copies import fetch
from targets.storage import Location


def find_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint dir itself, or a run dir's newest complete one; one in an object store is fetched
    (its local copy)."""
    where = Location.of(path)
    if where.remote:
        if (where / MARKER).exists():
            return RunDir(where.parent.parent).checkpoint(where.name)
        names = RunDir(where).checkpoint_names()
        if not names:
            raise UserError(f"{where} is neither a complete checkpoint nor a run dir with one")
        return RunDir(where).checkpoint(names[-1])
    path = where.path
    if (path / MARKER).is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"{path} is neither a complete checkpoint nor a run dir with one")
    return ckpt


def local_source(spec: str) -> Path:
    """A --model path as a local one: an exported .safetensors in an object store is copied, a run or checkpoint
    dir there gets its newest complete checkpoint fetched."""
    where = Location.of(spec)
    if not where.remote:
        return where.path
    if spec.endswith(".safetensors"):
        try:
            return fetch(where)
        except FileNotFoundError:
            raise UserError(f"--model {spec}: no such object") from None
    return find_checkpoint(spec)


def model_config_of(ckpt: Path) -> ModelConfig:
    raw = dict(read_state(ckpt)["model_config"])
    fields: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return ModelConfig(**fields)


def model_state_dict(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The checkpoint's model weights with Accelerate's and torch.compile's wrapper prefixes removed;
    with `prefix`, only the keys under it, without it (e.g. "encoder.")."""
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint {ckpt} has no model.safetensors")
    state = load_file(str(weights))
    for wrapper in WRAPPER_PREFIXES:
        consume_prefix_in_state_dict_if_present(state, wrapper)
    out = {k.removeprefix(prefix): v.contiguous() for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise UserError(f"checkpoint {ckpt}: no {prefix.rstrip('.') or 'model'} weights in model.safetensors")
    return out


def beit_metadata(kwargs: dict, classes: list[str]) -> dict[str, str]:
    """What a fine-tuned network's .safetensors records: timm's class and arguments, the class names."""
    return {"format": "timm.Beit", "timm_class": "Beit", "timm_kwargs": json.dumps(kwargs),
            "classes": json.dumps(classes)}
