"""An evaluation's result: the JSON record (written atomically), a table on stdout, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)


def publish(out: str, record: dict, headers: list[str], rows: list[list[str]], scalars: dict) -> None:
    """The result JSON, the table on stdout (the command's output), and TensorBoard scalars beside the JSON."""
    path = Path(out)
    write_json(path, record)
    if scalars and (path.parent.is_dir()):
        with SummaryWriter(str(path.with_suffix("")) + "-tensorboard") as writer:
            for k, v in scalars.items():
                writer.add_scalar(k, v, 0)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
             for r in [headers, ["-" * w for w in widths], *rows]]
    print("\n".join([*lines, f"results: {path}"]), flush=True)
