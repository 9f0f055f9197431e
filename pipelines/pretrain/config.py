"""Every option of `cae2 pretrain`, as one typed config (the command line is generated from it)."""

from __future__ import annotations

from dataclasses import dataclass

from cae2.config import LossCombine, LossKind, MaskStrategy
from cae2.errors import UserError
from targets.view_paths import VIEW_PATHS


@dataclass(kw_only=True)
class TrainConfig:
    """Every option of `cae2 pretrain` (the command line is generated from these fields). None means:
    the --model preset's default."""

    shards: str
    """Training shards: a brace pattern, a directory, a glob, or a file listing URLs."""
    targets: str
    """Target store made by extract-targets from these shards."""
    model: str = "cae2_vit_base"
    """Preset name (`cae2 models`)."""
    out: str = "runs/cae2"
    """Run directory: config.json, metrics.jsonl, TensorBoard, checkpoints."""
    steps: int | None = None
    """Optimizer steps; overrides --epochs."""
    epochs: float | None = None
    """Epochs of the data."""
    batch_size: int = 64
    """Per process and micro-batch. Global batch = batch_size x processes x grad_accum."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float | None = None
    """Peak lr at the global batch in use; default: the preset's lr x global batch / its lr_batch_ref."""
    min_lr: float | None = None
    """Final lr of the cosine schedule."""
    warmup_epochs: float | None = None
    """Linear warmup, in epochs."""
    warmup_steps: int | None = None
    """Linear warmup, in steps; overrides --warmup-epochs."""
    weight_decay: float | None = None
    """AdamW weight decay."""
    clip_grad: float | None = None
    """Gradient clipping max norm."""
    drop_path: float | None = None
    """Stochastic depth rate."""
    target_dim: int | None = None
    """Head output dim; must equal the store's teacher dim."""
    mask_strategy: MaskStrategy | None = None
    """Masking (block as in the paper; random for ablations)."""
    loss: LossKind | None = None
    """Token distance."""
    loss_combine: LossCombine | None = None
    """tokens (the code), sum (the paper), visible, masked."""
    seed: int = 0
    """Seed of the initialisation, the data order, the view index and the masks."""
    log_every: int = 10
    """Steps between metrics records."""
    save_every: int = 1000
    """Steps between checkpoints (also at the end and on SIGTERM)."""
    keep_last: int = 3
    """Complete checkpoints to keep."""
    resume: str | None = None
    """'latest' (newest complete checkpoint of --out) or a checkpoint path."""
    teacher_online: bool = False
    """Run the teacher every step instead of reading the store (the baseline the cache replaces)."""
    allow_random_teacher: bool = False
    """Accept a store made by a randomly initialised teacher (tests, demos)."""
    compile: bool = False
    """torch.compile the student (and the online teacher)."""
    view_path: str = "auto"
    """pillow: the loader workers cut the views; device: they decode and crop, the views are cut on the
    training device (bit-identical); auto: device when training on a GPU."""
    workers: int = 4
    """Data-loader worker processes per process."""
    shuffle_buffer: int = 1000
    """Samples in each worker's shuffle buffer."""
    mixed_precision: str | None = None
    """no, fp16 or bf16; default: Accelerate's launch config."""
    log_keys: bool = False
    """Write every sample key per step to RUN_DIR/keys/rank<r>.txt (audits of the data order)."""
    corrupt_targets: str = "stop"
    """A cached view whose bytes fail their checksum: stop (naming unit, row, key), skip (leave the sample
    out of its batch, with a warning), or off."""
    eval_every: int = 0
    """Steps between k-NN evaluations of the student on --eval-data (0: none); in metrics.jsonl and
    TensorBoard, without touching the data order or the random state."""
    eval_data: str | None = None
    """Labelled images for --eval-every: a folder with train/ and val/ in the ImageFolder layout."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise UserError("--steps must be >= 1")
        if self.view_path not in VIEW_PATHS:
            raise UserError(f"--view-path must be one of {', '.join(VIEW_PATHS)}, not {self.view_path!r}")
        if self.corrupt_targets not in ("stop", "skip", "off"):
            raise UserError(f"--corrupt-targets must be stop, skip or off, not {self.corrupt_targets!r}")
        if self.eval_every < 0 or (self.eval_every and not self.eval_data):
            raise UserError("--eval-every N needs N >= 0 and --eval-data (a folder with train/ and val/)")
