"""The frozen CLIP teacher: an open_clip vision tower that returns projected per-token latents.

Latents are the last block's output for all tokens (CLS + patches) through `ln_post` and then
`@ proj`, the CAE v2 targets. open_clip's own `output_tokens` returns patch tokens that are *not*
projected, so the tower is run step by step here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import open_clip
import torch
from huggingface_hub import hf_hub_download
from open_clip.pretrained import get_pretrained_cfg, list_pretrained, list_pretrained_tags_by_model
from torch import nn

from cae2.config import rgb
from cae2.errors import UserError
from cae2.fields import Range, check_fields
from targets.views import normalize

DEFAULT_TEACHER = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
RANDOM_INIT = "none"
BUNDLED_CONFIGS = Path(__file__).parent / "configs"  # cae2-tiny-clip: a 64 px, 32-d tower for tests and the demo


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """What to load. `name`: an open_clip model name or the path of an open_clip model-config JSON.
    `pretrained`: a tag (e.g. 'openai'), a local weights file, or 'none' (random init, tests and
    demos only). `quick_gelu`: None = automatic (on for OpenAI weights)."""

    name: str = DEFAULT_TEACHER
    """open_clip model name or model-config .json."""
    pretrained: str = DEFAULT_PRETRAINED
    """Tag (openai), weights file, or 'none' (random weights: tests and demos)."""
    quick_gelu: bool | None = None
    """QuickGELU activations; default: on for OpenAI weights."""
    image_size: Annotated[int, Range(min=1)] | None = None
    """Override the tower's input size (196 for ViT-L/14 so that the grid is 14x14)."""
    init_seed: Annotated[int, Range(min=0)] = 0
    """Seed of the random initialisation when pretrained is 'none' (so both stages build the same one)."""

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def is_random(self) -> bool:
        return self.pretrained.lower() == RANDOM_INIT


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _model_name(spec_name: str) -> str:
    """Register a config JSON with open_clip and return the model name to build."""
    bundled = BUNDLED_CONFIGS / f"{spec_name}.json"
    if bundled.is_file():
        spec_name = str(bundled)
    if spec_name.endswith(".json"):
        path = Path(spec_name)
        if not path.is_file():
            raise UserError(f"--teacher: config file {spec_name} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if spec_name not in open_clip.list_models():
        raise UserError(f"--teacher: unknown open_clip model {spec_name!r}; pick one of `open_clip.list_models()` "
                        f"(e.g. ViT-B-16, ViT-L-14) or pass an open_clip model-config .json file")
    return spec_name


class MissingWeights(UserError):
    """CLIP weights named by a tag that are neither in the local Hugging Face cache nor downloadable."""

    def __init__(self, model: str, tag: str, download: bool):
        self.model, self.tag, self.download = model, tag, download
        super().__init__(f"--pretrained: CLIP weights {model}/{tag} {self.where()}; pass --pretrained /path/to/weights "
                         f"(open_clip .bin/.safetensors or OpenAI .pt){'' if download else ', or add --download'}")

    def where(self) -> str:
        how = "could not be downloaded" if self.download else "are not in the local Hugging Face cache"
        return f"{how} (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})"


def resolve_weights(model_name: str, pretrained: str, allow_download: bool) -> tuple[str, dict]:
    """-> (local weights file, pretrained cfg). Looks only in the local cache unless allow_download."""
    if os.path.isfile(pretrained):
        return pretrained, {}
    if "/" in pretrained or pretrained.endswith((".bin", ".pt", ".pth", ".safetensors")):
        raise UserError(f"--pretrained: weights file {pretrained} does not exist")
    cfg = get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = list_pretrained_tags_by_model(model_name)
        raise UserError(f"--pretrained: {model_name} has no pretrained tag {pretrained!r}; known tags: "
                        f"{', '.join(tags) or 'none'}; or pass a local weights file")
    hub = cfg.get("hf_hub", "")
    repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for candidate in candidates:
        try:
            return hf_hub_download(repo, candidate, local_files_only=not allow_download), cfg
        except Exception:  # noqa: BLE001 - every miss gives the same user-facing message below
            continue
    raise MissingWeights(model_name, pretrained, allow_download)


@dataclass(frozen=True, kw_only=True)
class TeacherIdentity:
    """What a target store records about its teacher, and what a rerun must match (StoreMeta.teacher
    holds it as JSON)."""

    name: str
    """open_clip model name, or the stem of the model-config file."""
    config: dict | None = None
    """The model-config JSON itself, when the teacher was built from a file."""
    pretrained: str = RANDOM_INIT
    """Tag or absolute weights path."""
    weights_sha256: str | None = None
    random_init: bool = False
    init_seed: int | None = None
    quick_gelu: bool = False
    precision: str = "fp32"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TeacherIdentity:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def teacher_for_store(identity: TeacherIdentity | dict, input_size: int, device: torch.device | str,
                      pretrained: str | None = None, compile: bool = False) -> Teacher:
    """The teacher a target store was built with (its precision on a GPU, fp32 on a CPU; `pretrained`
    overrides a moved weights file); other weights than the recorded ones (sha256) are refused."""
    ident = identity if isinstance(identity, TeacherIdentity) else TeacherIdentity.from_json(identity)
    device = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="cae2-teacher-") as folder:  # a config file lives only while loading
        name = ident.name
        if ident.config:
            name = str(Path(folder) / f"{ident.name}.json")
            Path(name).write_text(json.dumps(ident.config))
        spec = TeacherSpec(name=name, pretrained=pretrained or ident.pretrained, quick_gelu=ident.quick_gelu,
                           image_size=input_size, init_seed=ident.init_seed or 0)
        teacher = Teacher(spec, device=device, precision=ident.precision if device.type == "cuda" else "fp32",
                          compile=compile)
    if ident.weights_sha256 and teacher.weights_sha256 != ident.weights_sha256:
        raise UserError(f"the teacher weights {teacher.weights_file} differ from the ones the target store was built "
                        "with (sha256); pass --pretrained with the original weights file")
    return teacher


class Teacher(nn.Module):
    """Frozen open_clip vision tower that owns its normalisation.

    Call it on uint8 views [B, 3, S, S] (normalised here with the tower's mean/std, on its device) or on
    already normalised float images -> latents [B, 1 + T, D] float32.
    """

    def __init__(self, spec: TeacherSpec, device: torch.device | str = "cpu", precision: str = "auto",
                 allow_download: bool = False, compile: bool = False):
        super().__init__()
        self.spec = spec
        self.device = torch.device(device)
        self.compiled = compile
        self._tower = torch.compile(self._latents, dynamic=False) if compile else self._latents
        self._batch = 0  # the largest batch seen: a compiled tower pads smaller ones to it (no recompile)
        name = _model_name(spec.name)
        self._config = json.loads(Path(spec.name).read_text()) if spec.name.endswith(".json") else None
        weights_file, pcfg = (None, {}) if spec.is_random else resolve_weights(name, spec.pretrained, allow_download)
        sha256 = sha256_file(weights_file) if weights_file else None
        quick_gelu = spec.quick_gelu
        if quick_gelu is None and not spec.is_random:
            quick_gelu = _quick_gelu_of(name, spec.pretrained, pcfg, sha256)
        self.quick_gelu = bool(quick_gelu) and not name.endswith("-quickgelu")
        patch = (open_clip.get_model_config(name) or {}).get("vision_cfg", {}).get("patch_size")
        if spec.image_size and isinstance(patch, int) and spec.image_size % patch:
            raise UserError(f"--teacher-image-size {spec.image_size} is not a multiple of {spec.name}'s patch size "
                            f"{patch}; pass a multiple (196 gives ViT-L/14 a 14x14 grid)")
        try:
            with torch.random.fork_rng(devices=[]), _quiet_random_init_warning(spec.is_random):
                torch.manual_seed(spec.init_seed)
                model = open_clip.create_model(name, pretrained=weights_file, force_quick_gelu=self.quick_gelu,
                                               force_image_size=spec.image_size)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"--pretrained: could not load {spec.pretrained} into {spec.name}: {e}") from e
        visual: Any = model.visual  # open_clip's VisionTransformer (its attributes are read as open_clip names them)
        del model
        if not hasattr(visual, "ln_post") or getattr(visual, "attn_pool", None) is not None \
                or getattr(visual, "final_ln_after_pool", False) or getattr(visual, "proj", None) is None \
                or getattr(visual, "pool_type", "tok") != "tok":
            raise UserError(f"--teacher: {spec.name} is not a CLIP ViT with a CLS token and a projection; "
                            "CAE v2 targets need ln_post + proj on every token")
        self.visual = visual.eval().requires_grad_(False).to(self.device)
        self.weights_file = weights_file
        self.weights_sha256 = sha256
        self.precision = _resolve_precision(precision, self.device)
        if self.precision.endswith("-weights"):  # OpenAI CLIP's own fp16 mode: weights cast, no autocast
            self.visual.to(_DTYPES[self.precision.removesuffix("-weights")])
        pp = visual.preprocess_cfg
        self.mean: tuple[float, float, float] = rgb(pp["mean"])
        self.std: tuple[float, float, float] = rgb(pp["std"])
        self.interpolation = str(pp.get("interpolation", "bicubic"))
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        self.grid_size = tuple(int(v) for v in visual.grid_size)
        self.num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        self.dim = int(visual.proj.shape[1])

    def identity(self) -> TeacherIdentity:
        """What the store records about the teacher (and what a rerun must match)."""
        from_file = self.spec.name.endswith(".json")
        return TeacherIdentity(
            name=Path(self.spec.name).stem if from_file else self.spec.name, config=self._config,
            pretrained=self.spec.pretrained if not self.weights_file or not os.path.isfile(self.spec.pretrained)
            else os.path.abspath(self.spec.pretrained),
            weights_sha256=self.weights_sha256, random_init=self.spec.is_random,
            init_seed=self.spec.init_seed if self.spec.is_random else None, quick_gelu=self.quick_gelu,
            precision=self.precision)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always frozen

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize(images, self.mean, self.std)
        n = len(images)
        if self.compiled:  # one static shape: smaller batches are padded to the largest one seen
            self._batch = max(self._batch, n)
            if n < self._batch:
                images = torch.cat([images, images.new_zeros((self._batch - n, *images.shape[1:]))])
        if self.precision in ("fp16", "bf16"):
            with torch.autocast(self.device.type, dtype=_DTYPES[self.precision]):
                x = self._tower(images)
        else:
            x = self._tower(images.to(self.visual.proj.dtype))
        return x[:n].float()

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v._embeds(images)  # [B, 1 + T, W], CLS first
        x = v.transformer(x)
        x = v.ln_post(x)
        return x @ v.proj  # [B, 1 + T, D]


def released_checkpoints() -> dict[str, tuple[str, str, bool]]:
    """sha256 -> (model, tag, QuickGELU) of the released checkpoints whose checksum open_clip's registry
    records (OpenAI's download URLs carry the file's sha256)."""
    out = {}
    for model, tag in list_pretrained():
        cfg = get_pretrained_cfg(model, tag)
        found = re.search(r"/([0-9a-f]{64})/", cfg.get("url", ""))
        if found:
            out[found.group(1)] = (model, tag, bool(cfg.get("quick_gelu")))
    return out


def _quick_gelu_of(model: str, pretrained: str, pcfg: dict, sha256: str | None) -> bool:
    """Whether the weights need QuickGELU: a tag's registry entry says so; a local file is recognised by
    its sha256 as a known release, or the choice is the user's (a wrong one gives silently wrong targets)."""
    if pcfg:
        return bool(pcfg.get("quick_gelu"))
    known = released_checkpoints().get(sha256 or "")
    if known:
        return known[2]
    raise UserError(f"--pretrained {pretrained}: sha256 {sha256} is not a released checkpoint open_clip knows, so "
                    "whether it was trained with QuickGELU cannot be told (OpenAI's weights were); pass --quick-gelu "
                    "for OpenAI-trained weights or --no-quick-gelu otherwise")


@contextlib.contextmanager
def _quiet_random_init_warning(asked_for: bool):
    """open_clip logs a warning for random init; when it was asked for, cae2 says so itself."""
    root = logging.getLogger()
    level = root.level
    if asked_for:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-weights", "fp16-weights")


def _resolve_precision(precision: str, device: torch.device) -> str:
    """fp16 / bf16: autocast over fp32 weights; *-weights: the weights themselves in that type."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"  # the official code runs the teacher in fp16
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision.startswith("fp16") and device.type == "cpu":
        raise UserError(f"--precision {precision} needs a GPU; use fp32 or bf16 on CPU")
    return precision
