"""What a target store is: `StoreMeta`, everything that determines its cached values (teacher, views, seed,
K, token grid, format, decoder), recorded in its root zarr.json under attrs["cae2"]; and the record layout
of a view's parameters (docs/cache.md)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: view_int without the contrast mean (stage 2 recomputes it from the image)
ROOT_ATTR = "cae2"
MARKER_ATTR = "complete"
N_INT, N_FLOAT = 10, 4


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """Everything that determines the cached values; two runs into one store must agree on it."""

    teacher: dict
    views: dict
    seed: int
    views_per_image: int
    input_size: int
    grid: tuple[int, int]
    num_tokens: int
    latent_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    images_per_shard: int = 32
    """Rows per block of a unit's latents (one file: a shard of the sharded Zarr array)."""
    latent_format: str = "fp16"
    """fp16: the teacher's latents in float16; int8: int8 with one float32 scale per token (targets.quantize)."""
    decoder: str = "pillow"
    """Image decoder whose pixels the views were cut from (`targets.decoders`; the view ops are exact on both
    view paths); rows a device decoder left to Pillow are listed in their unit's marker."""
    view_path: str = "pillow"
    """View path of the run that created the store (pillow | device: bit-identical views; each unit's
    marker records its own)."""
    written_by: str = "extract-targets"
    """The command that writes the store's units (extract-targets, or convert-targets for a converted copy):
    the one to rerun to finish or redo them."""
    schema_version: int = SCHEMA_VERSION
    cae2_version: str = ""
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    # Fields that do not change the values (layout/bookkeeping) are not compared.
    _UNCOMPARED = ("cae2_version", "created", "images_per_shard", "schema_version", "view_path", "written_by")

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> StoreMeta:
        d = dict(d)
        for k in ("grid", "mean", "std"):
            d[k] = tuple(d[k])
        return cls(**d)

    def identity(self) -> dict:
        """What determines the cached values (every compared field), as JSON: equal for two stores only when
        they hold the same targets for the same shards."""
        return {k: v for k, v in self.to_json().items() if k not in self._UNCOMPARED}

    def differences(self, other: StoreMeta) -> list[str]:
        a, b = self.to_json(), other.to_json()
        out = []
        for k in a:
            if k in self._UNCOMPARED:
                continue
            if isinstance(a[k], dict):
                out += [f"{k}.{kk}: store has {a[k].get(kk)!r}, this run {b[k].get(kk)!r}"
                        for kk in sorted(set(a[k]) | set(b[k])) if a[k].get(kk) != b[k].get(kk)]
            elif a[k] != b[k]:
                out.append(f"{k}: store has {a[k]!r}, this run {b[k]!r}")
        return out
