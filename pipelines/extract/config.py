"""Every option of `cae2 extract-targets`, as one typed config (the command line is generated from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from cae2.fields import OneOf, PathKind, Range, check_fields
from targets.claims import STALE_AFTER
from targets.decoders import DECODER_CHOICES
from targets.quantize import LATENT_FORMATS
from targets.storage_settings import StorageSettings
from targets.teacher import PRECISIONS, TeacherSpec
from targets.view_paths import VIEW_PATHS
from targets.views import ViewSettings


@dataclass(kw_only=True)
class ExtractConfig(StorageSettings):
    """Every option of `cae2 extract-targets` (the command line is generated from these fields)."""

    shards: str
    """Shards: a brace pattern, a directory, a glob, or a file listing URLs."""
    out: Annotated[str, PathKind("out_dir")]
    """Target store (a Zarr v3 directory on a local or mounted file system); rerun to resume."""
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    views: ViewSettings = field(default_factory=ViewSettings)
    views_per_image: Annotated[int, Range(min=1)] = 5
    """K: cached views per image (storage grows linearly; see docs/cache.md)."""
    seed: Annotated[int, Range(min=0)] = 0
    """Seed of the view parameters (and of a random teacher's weights)."""
    batch_size: Annotated[int, Range(min=1)] = 256
    """Views per teacher forward."""
    workers: Annotated[int, Range(min=0)] = 4
    """Data-loader worker processes per rank (decode + views)."""
    precision: Annotated[str, OneOf(PRECISIONS)] = "auto"
    """auto (fp16 on a GPU, fp32 on CPU), fp32, bf16, fp16 (autocast), bf16-weights, fp16-weights (the
    weights cast)."""
    images_per_shard: Annotated[int, Range(min=1)] = 32
    """Images per block of the latents array (one file, one write each; a shard in Zarr's terms)."""
    allow_download: bool = False
    """Allow downloading CLIP weights (else the local Hugging Face cache only)."""
    latent_format: Annotated[str, OneOf(LATENT_FORMATS)] = "fp16"
    """fp16, or int8 with one float32 scale per token (half the bytes; targets.quantize)."""
    min_cosine: Annotated[float, Range(0, 1)] = 0.999
    """int8: a unit whose dequantised latents reach a lower token cosine to the teacher's output fails."""
    claim_timeout: Annotated[float, Range(min=0, open_min=True)] = STALE_AFTER
    """Seconds without a heartbeat after which another host's claim on a unit counts as abandoned."""
    compile_teacher: bool = False
    """torch.compile the teacher's tower (one static batch shape; the last batch is padded to it)."""
    view_path: Annotated[str, OneOf(VIEW_PATHS)] = "auto"
    """pillow: views cut by the decode workers (the exact reference); device: the workers decode, the
    views are cut batched on the teacher's device (bit-identical); auto: device when that is a GPU."""
    decoder: Annotated[str, OneOf(DECODER_CHOICES)] = "host"
    """host: Pillow in the decode workers (the reference); device: the teacher's device decodes whole batches
    of plain JPEGs (nvJPEG on a GPU; the store records the decoder, and each image Pillow decodes instead:
    grayscale, CMYK, progressive, other formats). Needs the device view path."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        check_fields(self)
