"""Every option of `cae2 inspect`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from cae2.fields import Argument, PathKind, Range, Switch
from targets.storage_settings import StorageSettings


@dataclass(kw_only=True)
class InspectConfig(StorageSettings):
    """Every option of `cae2 inspect` (the command line is generated from these fields)."""

    target: Annotated[str, Argument()]
    """A target store (its status; with --shards and --report, pictures of its views and targets) or a run dir
    (its summary; with --report, its loss and lr curves)."""
    shards: str | None = None
    """The store's shards: the units not started are counted against them, and --report reads their images."""
    report: Annotated[str, PathKind("out_dir")] | None = None
    """Folder to write the pictures into: a store's report.html and contact_sheet.png (needs --shards), a run's
    curves.png."""
    samples: Annotated[int, Range(1, 512)] = 16
    """Images the report shows."""
    seed: int = 0
    """Which images the report samples."""
    window: Annotated[float, Range(min=0, open_min=True)] = 10.0
    """Minutes of completed units the extraction rate and the ETA are measured over."""
    as_json: Annotated[bool, Switch()] = False
    """Print the status or summary as JSON."""
