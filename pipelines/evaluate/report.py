"""An evaluation's result: the JSON record (written atomically), a table on stdout, TensorBoard scalars; in a
local folder or an object store (written locally, then uploaded)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from targets.storage import Location


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def publish(out: str, record: dict, headers: list[str], rows: list[list[str]], scalars: dict) -> None:
    """The result JSON, the table on stdout (the command's output), and TensorBoard scalars beside the JSON."""
    where = Location.of(out)
    staging = Path(tempfile.mkdtemp(prefix="cae2-result-")) if where.remote else None
    path = staging / where.name if staging else where.path
    try:
        write_json(path, record)
        tensorboard = Path(str(path.with_suffix("")) + "-tensorboard")
        if scalars and path.parent.is_dir():
            with SummaryWriter(str(tensorboard)) as writer:
                for k, v in scalars.items():
                    writer.add_scalar(k, v, 0)
        if staging:
            for p in [path, *sorted(f for f in tensorboard.rglob("*") if f.is_file())]:
                (where.parent / str(p.relative_to(staging))).upload(p)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
             for r in [headers, ["-" * w for w in widths], *rows]]
    print("\n".join([*lines, f"results: {where}"]), flush=True)
