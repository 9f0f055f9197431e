"""The options of `cae2 evaluate knn|linear`, as typed configs (the command lines are generated from them).
The fields every evaluation shares are declared once, in the base classes."""

from __future__ import annotations

from dataclasses import dataclass

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


@dataclass(kw_only=True)
class EvalData:
    """What every evaluation command reads and writes."""

    model: str
    """A run or checkpoint dir, an exported .safetensors, timm:NAME[:random], or clip:MODEL:WEIGHTS."""
    train: str
    """Labelled training images: an ImageFolder tree (<class>/<image>) or WebDataset shards with cls."""
    val: str
    """Labelled validation images (the training split's classes)."""
    out: str
    """Result JSON (every number and setting); TensorBoard scalars go beside it."""


@dataclass(kw_only=True)
class FeatureOptions(EvalData):
    """Frozen features of the evaluation transform (Resize 256 bicubic + CenterCrop 224)."""

    pool: str = "cls"
    """Feature: cls (CLS after the final norm; CAE v2 aligns it to CLIP's), avg (mean of patch tokens), cls+avg;
    the official linear protocol uses cls."""
    batch_size: int = 128
    """Images per forward (official linear protocol: per process and micro-batch)."""
    workers: int = 4
    """Data-loader worker processes (decoding)."""
    cache_dir: str | None = None
    """Save the features here, once per model, data, transform and pool, and reuse them."""
    device: str = "auto"
    """auto (cuda when available), cuda or cpu (the official linear protocol runs where Accelerate puts it)."""


@dataclass(kw_only=True)
class KnnConfig(FeatureOptions):
    """Every option of `cae2 evaluate knn`."""

    ks: str = ",".join(map(str, KS))
    """Numbers of neighbours, comma-separated."""
    temperature: float = TEMPERATURE
    """Voting weights exp(similarity / temperature)."""


@dataclass(kw_only=True)
class LinearConfig(FeatureOptions):
    """Every option of `cae2 evaluate linear`."""

    protocol: str = "features"
    """features: logistic regression on frozen features, L2 chosen on held-out training data (fast;
    not comparable with the paper); official: the paper's probe (LARS, 90 epochs, augmentation; under
    accelerate launch, resumable)."""
    epochs: int = 90
    """official: epochs."""
    warmup_epochs: float = 10
    """official: linear warmup epochs."""
    blr: float = 0.1
    """official: base lr; lr = blr x global batch / 256."""
    global_batch: int = 16384
    """official: images per optimizer step, by accumulation (the paper: 16,384 Tiny, 8,192 Small/Base)."""
    seed: int = 0
    """official: seed of the head's initialisation, the data order and the crops."""
    run_dir: str | None = None
    """official: checkpoints and TensorBoard (default: OUT without .json, plus -run)."""
    save_every: int = 100
    """official: steps between checkpoints (also at the end)."""
    keep_last: int = 2
    """official: complete checkpoints to keep."""
    resume: str | None = None
    """official: 'latest' or a checkpoint path."""
    log_every: int = 10
    """official: steps between TensorBoard scalars."""
    mixed_precision: str | None = None
    """official: no, fp16 or bf16 (default: Accelerate's launch config)."""
