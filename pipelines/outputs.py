"""Where a command may write: never inside what another command made (a run dir, a checkpoint, a target store,
a shard folder), never onto its own input. Each kind is known by the file its maker writes into its root."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from cae2.errors import UserError
from targets.storage import Location, inside


def kind_of(folder: Location) -> str | None:
    """What made `folder`, from the files its maker writes into it; None: an ordinary folder. In an object store
    one listing of the folder."""
    listed = set(folder.children()) if folder.remote else None

    def has(name: str) -> bool:
        return name in listed if listed is not None else (folder.path / name).is_file()

    def has_dir(name: str) -> bool:
        return name in listed if listed is not None else (folder.path / name).is_dir()
    if has("trainer_state.json"):
        return "checkpoint"
    if has("metrics.jsonl") or (has("config.json") and has_dir("checkpoints")):
        return "run dir"
    if has("zarr.json"):
        return "target store"
    if has("make-shards.json"):
        return "shard folder"
    return None


def _ancestors(where: Location) -> Iterator[Location]:
    """The folders above `where`, nearest first (local: to the root; an object store: to the bucket)."""
    if where.remote:
        scheme, rest = where.url.split("://", 1)
        parts = rest.split("/")
        for n in range(len(parts) - 1, 1, -1):
            yield Location(f"{scheme}://{'/'.join(parts[:n])}")
        return
    path = where.path.resolve()
    yield from (Location(str(p)) for p in path.parents)


def check_output(option: str, out: str | os.PathLike, makes: str | None = None,
                 inputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """Refuse `out` when a folder above it (or `out` itself, unless it is a `makes` the command resumes) was made
    by another command, or when it overlaps one of the command's `inputs` ({option: location})."""
    where = Location.of(out)
    itself = kind_of(where) if makes is not None else None
    if itself is not None and itself != makes:
        raise UserError(f"{option} {out} is a {itself}: writing there would replace what it holds; choose a new "
                        "path")
    for folder in _ancestors(where):
        kind = kind_of(folder)
        if kind is not None:
            raise UserError(f"{option} {out} is inside the {kind} {folder}: writing there would change what it "
                            "holds; choose a path outside it")
    for option_in, source in (inputs or {}).items():
        if source is not None and inside(where.url, _folder_of(str(source))):
            raise UserError(f"{option} {out} overlaps {option_in} {source}: a command never writes over or into its "
                            "own input; choose another path")


def _folder_of(spec: str) -> str:
    """A location, or the folder of a pattern (a brace pattern or a glob of shards)."""
    cut = min((spec.index(c) for c in "{*?[" if c in spec), default=None)
    return spec if cut is None else spec[:cut].rsplit("/", 1)[0] or "."
