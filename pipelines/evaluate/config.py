"""The options of `cae2 evaluate knn|linear` as typed configs (the command lines are generated from
them; finetune's are in finetune_config.py). The fields every evaluation shares are declared once, in the
base classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cae2.errors import UserError
from cae2.fields import OneOf, PathKind, Range, check_fields
from targets.storage_settings import StorageSettings

KS = (10, 20, 100, 200)
POOLS = ("cls", "avg", "cls+avg")
POSITIVE = Range(min=0, open_min=True)
TEMPERATURE = 0.07


@dataclass(kw_only=True)
class EvalSource(StorageSettings):
    """What every evaluation command reads: the model and the labelled splits."""

    model: str
    """A run or checkpoint dir, an exported .safetensors, timm:NAME[:random], or clip:MODEL:WEIGHTS."""
    train: str
    """Labelled training images: an ImageFolder tree (<class>/<image>) or WebDataset shards with cls."""
    val: str
    """Labelled validation images (the training split's classes)."""
    seed: Annotated[int, Range(min=0)] = 0
    """Seed of a random model's weights (timm:NAME:random, clip:MODEL:none) and of every random draw of the
    evaluation (the official probe's head, data order and crops)."""
    quick_gelu: bool | None = None
    """clip: models: QuickGELU activations (default: as open_clip records for a tag or a known release; a
    local file it does not know needs --quick-gelu for OpenAI-trained weights, else --no-quick-gelu)."""
    download: bool = False
    """Allow downloading the weights of clip: and timm: models (else the local Hugging Face cache only)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(kw_only=True)
class EvalData(EvalSource):
    """An evaluation whose result is one JSON file."""

    out: Annotated[str, PathKind("new_file")]
    """Result JSON (every number and setting); TensorBoard scalars go beside it."""


@dataclass(kw_only=True)
class FeatureOptions(EvalData):
    """Frozen features of the evaluation transform (Resize 256 bicubic + CenterCrop 224)."""

    pool: Annotated[str, OneOf(POOLS)] = "cls"
    """Feature: cls (CLS after the final norm; CAE v2 aligns it to CLIP's), avg (mean of patch tokens), cls+avg;
    the official linear protocol uses cls."""
    batch_size: Annotated[int, Range(min=1)] = 128
    """Images per forward (official linear protocol: per process and micro-batch)."""
    workers: Annotated[int, Range(min=0)] = 4
    """Data-loader worker processes (decoding)."""
    cache_dir: Annotated[str, PathKind("out_dir")] | None = None
    """Save the features here, once per model, data, transform and pool, and reuse them."""
    device: Annotated[str, OneOf(("auto", "cuda", "cpu"))] = "auto"
    """auto (cuda when available), cuda or cpu (the official linear protocol runs where Accelerate puts it)."""


@dataclass(kw_only=True)
class KnnConfig(FeatureOptions):
    """Every option of `cae2 evaluate knn`."""

    ks: str = ",".join(map(str, KS))
    """Numbers of neighbours, comma-separated."""
    temperature: Annotated[float, POSITIVE] = TEMPERATURE
    """Voting weights exp(similarity / temperature)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.neighbours()  # refuses a bad --ks before any work

    def neighbours(self) -> tuple[int, ...]:
        try:
            ks = tuple(int(k) for k in str(self.ks).split(","))
        except ValueError:
            ks = ()
        if not ks or min(ks) < 1:
            raise UserError(f"--ks {self.ks}: comma-separated positive numbers of neighbours, e.g. 10,20,100,200")
        return ks


@dataclass(kw_only=True)
class LinearConfig(FeatureOptions):
    """Every option of `cae2 evaluate linear`."""

    protocol: Annotated[str, OneOf(("features", "official"))] = "features"
    """features: logistic regression on frozen features, L2 chosen on held-out training data (fast;
    not comparable with the paper); official: the paper's probe (LARS, 90 epochs, augmentation; under
    accelerate launch, resumable)."""
    epochs: Annotated[int, Range(min=1)] = 90
    """official: epochs."""
    warmup_epochs: Annotated[float, Range(min=0)] = 10
    """official: linear warmup epochs."""
    blr: Annotated[float, POSITIVE] = 0.1
    """official: base lr; lr = blr x global batch / 256."""
    global_batch: Annotated[int, Range(min=1)] = 16384
    """official: images per optimizer step, by accumulation (the paper: 16,384 Tiny, 8,192 Small/Base)."""
    run_dir: Annotated[str, PathKind("out_dir")] | None = None
    """official: checkpoints and TensorBoard (default: OUT without .json, plus -run)."""
    save_every: Annotated[int, Range(min=1)] = 100
    """official: steps between checkpoints (also at the end)."""
    keep_last: Annotated[int, Range(min=1)] = 2
    """official: complete checkpoints to keep."""
    resume: str | None = None
    """official: 'latest' or a checkpoint path."""
    log_every: Annotated[int, Range(min=1)] = 10
    """official: steps between metrics records (RUN_DIR/metrics.jsonl, TensorBoard)."""
    progress: bool = True
    """official: show progress (a bar on a terminal, a status line every 30 s in a log file)."""
    mixed_precision: Annotated[str, OneOf(("no", "fp16", "bf16"))] | None = None
    """official: no, fp16 or bf16 (default: Accelerate's launch config)."""
