"""Every option of `cae2 extract-targets`, as one typed config (the command line is generated from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cae2.errors import UserError
from targets.cache import require_local_out
from targets.claims import STALE_AFTER
from targets.quantize import LATENT_FORMATS
from targets.teacher import TeacherSpec
from targets.view_paths import VIEW_PATHS
from targets.views import ViewSettings


@dataclass(kw_only=True)
class ExtractConfig:
    """Every option of `cae2 extract-targets` (the command line is generated from these fields)."""

    shards: str
    """Shards: a brace pattern, a directory, a glob, or a file listing URLs."""
    out: str
    """Target store (a Zarr v3 directory on a local or mounted file system); rerun to resume."""
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    views: ViewSettings = field(default_factory=ViewSettings)
    views_per_image: int = 5
    """K: cached views per image (storage grows linearly; see docs/cache.md)."""
    seed: int = 0
    """Seed of the view parameters (and of a random teacher's weights)."""
    batch_size: int = 256
    """Views per teacher forward."""
    workers: int = 4
    """Data-loader worker processes per rank (decode + views)."""
    precision: str = "auto"
    """auto (fp16 on a GPU, fp32 on CPU), fp32, bf16, fp16 (autocast), bf16-weights, fp16-weights (the
    weights cast)."""
    images_per_shard: int = 32
    """Images per block of the latents array (one file, one write each; a shard in Zarr's terms)."""
    allow_download: bool = False
    """Allow downloading CLIP weights (else the local Hugging Face cache only)."""
    latent_format: str = "fp16"
    """fp16, or int8 with one float32 scale per token (half the bytes; targets.quantize)."""
    min_cosine: float = 0.999
    """int8: a unit whose dequantised latents reach a lower token cosine to the teacher's output fails."""
    claim_timeout: float = STALE_AFTER
    """Seconds without a heartbeat after which another host's claim on a unit counts as abandoned."""
    compile_teacher: bool = False
    """torch.compile the teacher's tower (one static batch shape; the last batch is padded to it)."""
    view_path: str = "auto"
    """pillow: views cut by the decode workers (the exact reference); device: the workers decode, the
    views are cut batched on the teacher's device (bit-identical); auto: device when that is a GPU."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.view_path not in VIEW_PATHS:
            raise UserError(f"--view-path must be one of {', '.join(VIEW_PATHS)}, not {self.view_path!r}")
        if self.latent_format not in LATENT_FORMATS:
            raise UserError(f"--latent-format must be one of {', '.join(LATENT_FORMATS)}, not {self.latent_format!r}")
        if not 0 <= self.min_cosine <= 1:
            raise UserError(f"--min-cosine must be in [0, 1], not {self.min_cosine}")
        if self.views_per_image < 1:
            raise UserError("--views must be >= 1")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        if self.workers < 0:
            raise UserError("--workers must be >= 0")
        require_local_out(self.out)  # before the teacher is loaded
