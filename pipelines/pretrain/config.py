"""Every option of `cae2 pretrain`, as one typed config (the command line is generated from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cae2.config import LossCombine, LossKind, MaskStrategy
from cae2.errors import UserError
from cae2.fields import OneOf, PathKind, Range, check_fields
from targets.decoders import STAGE2_DECODERS
from targets.storage_settings import StorageSettings
from targets.view_paths import VIEW_PATHS

POSITIVE = Range(min=0, open_min=True)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
"""torch.compile's modes: reduce-overhead replays CUDA graphs (fewer kernel launches: the small students'
step is launch-bound on a large GPU); max-autotune searches kernel configurations at start-up."""


@dataclass(kw_only=True)
class TrainConfig(StorageSettings):
    """Every option of `cae2 pretrain` (the command line is generated from these fields). None means:
    the --model preset's default."""

    shards: str
    """Training shards: a brace pattern, a directory, a glob, or a file listing URLs."""
    targets: str
    """Target store made by extract-targets from these shards."""
    model: str = "cae2_vit_base"
    """Preset name (`cae2 models`)."""
    out: Annotated[str, PathKind("out_dir")] = "runs/cae2"
    """Run directory: config.json, metrics.jsonl, TensorBoard, checkpoints."""
    steps: Annotated[int, Range(min=1)] | None = None
    """Optimizer steps; overrides --epochs."""
    epochs: Annotated[float, POSITIVE] | None = None
    """Epochs of the data."""
    batch_size: Annotated[int, Range(min=1)] = 64
    """Per process and micro-batch. Global batch = batch_size x processes x grad_accum."""
    grad_accum: Annotated[int, Range(min=1)] = 1
    """Micro-batches per optimizer step."""
    lr: Annotated[float, POSITIVE] | None = None
    """Peak lr at the global batch in use; default: the preset's lr x global batch / its lr_batch_ref."""
    min_lr: Annotated[float, Range(min=0)] | None = None
    """Final lr of the cosine schedule."""
    warmup_epochs: Annotated[float, Range(min=0)] | None = None
    """Linear warmup, in epochs."""
    warmup_steps: Annotated[int, Range(min=0)] | None = None
    """Linear warmup, in steps; overrides --warmup-epochs."""
    weight_decay: Annotated[float, Range(min=0)] | None = None
    """AdamW weight decay."""
    clip_grad: Annotated[float, POSITIVE] | None = None
    """Gradient clipping max norm."""
    drop_path: Annotated[float, Range(0, 1, open_max=True)] | None = None
    """Stochastic depth rate."""
    target_dim: Annotated[int, Range(min=1)] | None = None
    """Head output dim; must equal the store's teacher dim."""
    mask_strategy: MaskStrategy | None = None
    """Masking (block as in the paper; random for ablations)."""
    loss: LossKind | None = None
    """Token distance."""
    loss_combine: LossCombine | None = None
    """tokens (the code), sum (the paper), visible, masked."""
    seed: Annotated[int, Range(min=0)] = 0
    """Seed of the initialisation, the data order, the view index and the masks."""
    log_every: Annotated[int, Range(min=1)] = 10
    """Steps between metrics records."""
    save_every: Annotated[int, Range(min=1)] = 1000
    """Steps between checkpoints (also at the end and on SIGTERM)."""
    keep_last: Annotated[int, Range(min=1)] = 3
    """Complete checkpoints to keep."""
    resume: str | None = None
    """'latest' (newest complete checkpoint of --out) or a checkpoint path."""
    teacher_online: bool = False
    """Run the teacher every step instead of reading the store (the baseline the cache replaces)."""
    allow_random_teacher: bool = False
    """Accept a store made by a randomly initialised teacher (tests, demos)."""
    compile: bool = False
    """torch.compile the student (and the online teacher)."""
    compile_mode: Annotated[str, OneOf(COMPILE_MODES)] = "default"
    """torch.compile's mode for the student with --compile: default, reduce-overhead (CUDA graphs),
    max-autotune-no-cudagraphs, max-autotune. `python -m bench.speedup --steps-only` measures them."""
    view_path: Annotated[str, OneOf(VIEW_PATHS)] = "auto"
    """pillow: the loader workers cut the views; device: they decode and crop, the views are cut on the
    training device (bit-identical); auto: device when training on a GPU."""
    decoder: Annotated[str, OneOf(STAGE2_DECODERS)] = "store"
    """store: decode as the store's views were (Pillow, or the device decoder that made them, on the device
    view path); host: Pillow in the workers; device: the training device decodes plain JPEGs (nvJPEG on a
    GPU). A decoder of other pixels than the store's is said in the log."""
    workers: Annotated[int, Range(min=0)] = 4
    """Data-loader worker processes per process."""
    shuffle_buffer: Annotated[int, Range(min=0)] = 1000
    """Samples in each worker's shuffle buffer."""
    mixed_precision: Annotated[str, OneOf(MIXED_PRECISIONS)] | None = None
    """no, fp16 or bf16; default: Accelerate's launch config."""
    log_keys: bool = False
    """Write every sample key per step to RUN_DIR/keys/rank<r>.txt (audits of the data order)."""
    corrupt_targets: Annotated[str, OneOf(("stop", "skip", "off"))] = "stop"
    """A cached view whose bytes fail their checksum, or a sample whose image is not the one stage 1 made its
    targets from (its crc32c): stop (naming shard and key), skip (leave the sample out of its batch, with a
    counted warning), or off (no checks)."""
    image_every: Annotated[int, Range(min=0)] | None = None
    """Steps between TensorBoard pictures of 4 fixed samples (view, mask, target and predicted latents as PCA
    maps) and histograms of the token cosines (0: none; default: every 1000 steps for runs of 5000 steps or more,
    none for shorter ones)."""
    eval_every: Annotated[int, Range(min=0)] = 0
    """Steps between k-NN evaluations of the student on --eval-data (0: none); in metrics.jsonl and
    TensorBoard, without touching the data order or the random state."""
    eval_data: Annotated[str, PathKind("dir")] | None = None
    """Labelled images for --eval-every: a folder with train/ and val/ in the ImageFolder layout."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.eval_every and not self.eval_data:
            raise UserError("--eval-every N needs --eval-data (a folder with train/ and val/)")
        if self.compile_mode != "default" and not self.compile:
            raise UserError(f"--compile-mode {self.compile_mode} takes effect only with --compile; add --compile")
