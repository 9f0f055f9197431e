"""`cae2 evaluate finetune`: its options, and the paper's recipe for each size (CAE v2, Table 9).

Every recipe value is an option; None means: the --preset's value (the preset defaults to the one
for the model's width).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Annotated

from cae2.errors import UserError
from cae2.fields import OneOf, PathKind, Range
from pipelines.evaluate.config import POSITIVE, EvalSource

UNIT = Range(0, 1)


@dataclass(frozen=True, kw_only=True)
class FinetuneRecipe:
    """One size's fine-tuning setting (Table 9; the authors' tools/run_class_finetuning.py)."""

    lr: float
    """Peak lr at `batch_ref` images per step."""
    layer_decay: float
    epochs: float
    rand_augment: str
    """timm RandAugment magnitude and its std: m<M>-mstd<S> ('none': off)."""
    smoothing: float
    mixup: float
    cutmix: float
    color_jitter: float
    drop_path: float
    warmup_epochs: float = 5
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    batch_ref: int = 1024
    input_size: int = 224


RECIPES = {
    "tiny": FinetuneRecipe(lr=2e-3, layer_decay=0.75, epochs=100, rand_augment="m10-mstd0.5", smoothing=0.0,
                           mixup=0.2, cutmix=0.0, color_jitter=0.3, drop_path=0.0),
    "small": FinetuneRecipe(lr=5e-4, layer_decay=0.8, epochs=100, rand_augment="m9-mstd0.5", smoothing=0.1,
                            mixup=0.8, cutmix=1.0, color_jitter=0.4, drop_path=0.1),
    "base": FinetuneRecipe(lr=2e-4, layer_decay=0.75, epochs=100, rand_augment="m9-mstd0.5", smoothing=0.1,
                           mixup=0.8, cutmix=1.0, color_jitter=0.4, drop_path=0.1),
    "large": FinetuneRecipe(lr=4e-4, layer_decay=0.8, epochs=50, rand_augment="m9-mstd0.5", smoothing=0.1,
                            mixup=0.8, cutmix=1.0, color_jitter=0.4, drop_path=0.2),
}
WIDTHS = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


@dataclass(kw_only=True)
class FinetuneConfig(EvalSource):
    """Every option of `cae2 evaluate finetune` (None: the preset's value)."""

    out: Annotated[str, PathKind("out_dir")]
    """Run directory: checkpoints, metrics.jsonl, TensorBoard, result.json and the fine-tuned model."""
    preset: Annotated[str, OneOf(tuple(RECIPES))] | None = None
    """Table 9's recipe for tiny, small, base or large; default: the one for the model's width."""
    epochs: Annotated[float, POSITIVE] | None = None
    """Epochs (the paper: 100, 100, 100, 50)."""
    warmup_epochs: Annotated[float, Range(min=0)] | None = None
    """Linear warmup, in epochs (5)."""
    global_batch: Annotated[int, Range(min=1)] = 1024
    """Images per optimizer step, over every process, by gradient accumulation (the paper: 1024)."""
    batch_size: Annotated[int, Range(min=1)] = 64
    """Images per process and micro-batch."""
    lr: Annotated[float, POSITIVE] | None = None
    """Peak lr, used as given; default: the preset's x global batch / 1024."""
    min_lr: Annotated[float, Range(min=0)] | None = None
    """Final lr of the cosine (1e-6)."""
    weight_decay: Annotated[float, Range(min=0)] | None = None
    """AdamW weight decay (0.05; none on norms, biases, tokens and position tables)."""
    layer_decay: Annotated[float, Range(0, 1, open_min=True)] | None = None
    """Layer-wise lr decay: block i of L gets layer_decay^(L + 1 - i) of the lr (0.75 or 0.8)."""
    rand_augment: str | None = None
    """RandAugment m<M>-mstd<S> (m10-mstd0.5 for tiny, m9-mstd0.5 otherwise), or none."""
    color_jitter: Annotated[float, Range(min=0)] | None = None
    """Colour jitter strength (timm applies it only when RandAugment is off)."""
    mixup: Annotated[float, Range(min=0)] | None = None
    """Mixup alpha (0.2 tiny, 0.8 otherwise; 0: off)."""
    cutmix: Annotated[float, Range(min=0)] | None = None
    """CutMix alpha (0 tiny, 1.0 otherwise; 0: off)."""
    smoothing: Annotated[float, Range(0, 1, open_max=True)] | None = None
    """Label smoothing (0 tiny, 0.1 otherwise)."""
    drop_path: Annotated[float, Range(0, 1, open_max=True)] | None = None
    """Stochastic depth rate (0, 0.1, 0.1, 0.2)."""
    input_size: Annotated[int, Range(min=16)] | None = None
    """Input resolution (224); position embeddings are resampled to it."""
    rel_pos_bias: bool = True
    """A zero-initialised relative position bias in every block (the authors' default)."""
    model_ema: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3) and report its accuracy too."""
    ema_decay: Annotated[float, Range(0, 1, open_max=True)] = 0.9999
    """Decay of --model-ema."""
    workers: Annotated[int, Range(min=0)] = 8
    """Data-loader worker processes per process (decoding and augmentation)."""
    save_every: Annotated[int, Range(min=1)] = 1000
    """Steps between checkpoints (also at every epoch's end, at the end and on SIGTERM or Ctrl-C)."""
    keep_last: Annotated[int, Range(min=1)] = 2
    """Complete checkpoints to keep."""
    log_every: Annotated[int, Range(min=1)] = 20
    """Steps between metrics records."""
    resume: str | None = None
    """'latest' (newest complete checkpoint of --out) or a checkpoint path."""
    mixed_precision: Annotated[str, OneOf(("no", "fp16", "bf16"))] | None = None
    """no, fp16 or bf16 (default: Accelerate's launch config)."""
    misclassified: Annotated[int, Range(min=0)] = 8
    """Misclassified validation images shown in TensorBoard after every epoch (misclassified/<i>: the image, its
    class and the top 3, and the encoder's patch tokens as a PCA map); 0: none."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rand_augment is not None:
            rand_augment_string(self.rand_augment)  # refuses a malformed value before any work

    def recipe(self, width: int) -> tuple[str, FinetuneRecipe]:
        """(preset name, the preset's recipe with every option given here applied) for a model this wide."""
        name = self.preset or WIDTHS.get(width)
        if name is None:
            raise UserError(f"--preset: the model is {width}-d, not a paper size; pass --preset tiny, small, base or "
                            "large")
        if self.preset and WIDTHS.get(width) not in (None, self.preset):
            raise UserError(f"--preset {self.preset} is the recipe for ViT-{self.preset.capitalize()}, but the model "
                            f"is {width}-d (ViT-{WIDTHS[width].capitalize()}); pass --preset {WIDTHS[width]} or leave "
                            "it out")
        given = {f.name: getattr(self, f.name) for f in fields(FinetuneRecipe)  # --lr is used as given, not here
                 if f.name != "lr" and getattr(self, f.name, None) is not None}
        return name, replace(RECIPES[name], **given)


def rand_augment_string(value: str) -> str | None:
    """'m9-mstd0.5' -> timm's 'rand-m9-mstd0.5-inc1' (the authors' policy); 'none' -> None."""
    if value == "none":
        return None
    parts = dict((p[:1], p[1:]) if p[0] == "m" and not p.startswith("mstd") else (p[:4], p[4:])
                 for p in value.split("-") if p)
    try:
        magnitude, std = int(parts["m"]), float(parts.get("mstd", 0.5))
    except (KeyError, ValueError):
        raise UserError(f"--rand-augment {value}: write m<magnitude>-mstd<std>, e.g. m9-mstd0.5, or none") from None
    if not 0 <= magnitude <= 30 or std < 0:
        raise UserError(f"--rand-augment {value}: the magnitude is 0..30 and the std >= 0")
    return f"rand-m{magnitude}-mstd{std}-inc1"
