"""What a unit's completion marker promises: every file of the unit and its size. A unit whose files do
not hold that promise is damaged (named by verify-targets and pretrain, redone by a rerun)."""

from __future__ import annotations

from pathlib import Path

REQUIRED_ARRAYS = ("latents", "keys", "valid", "view_int", "view_float", "image_hw")


def unit_files(folder: Path) -> dict[str, int | None]:
    """{path relative to the unit folder: size} of every file of a unit but its own zarr.json (which
    holds the marker): what a completion marker promises. Array metadata (zarr.json) is promised to
    exist, not its size: tools may rewrite it compatibly."""
    own = folder / "zarr.json"
    return {str(p.relative_to(folder)): None if p.name == "zarr.json" else p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p != own}


def files_problem(folder: Path, marker: dict, latent_format: str, sizes: dict[str, int] | None = None,
                  where: str | None = None) -> str | None:
    """Why the files of a unit do not hold what its marker promises, or None: checked in `folder`, or (an
    object-store unit) against `sizes` from a listing of `where`. Markers written before they listed files
    promise the arrays' metadata."""
    files = marker.get("files")
    if files is None:
        arrays = REQUIRED_ARRAYS + (("scales",) if latent_format == "int8" else ())
        files = {f"{a}/zarr.json": None for a in arrays if marker["num_samples"] or a == "latents"}
    place = where or str(folder)
    for name, size in files.items():
        if sizes is not None:
            actual = sizes.get(name)
        else:
            try:
                actual = (folder / name).stat().st_size
            except FileNotFoundError:
                actual = None
        if actual is None:
            return f"{place}/{name} is missing"
        if size is not None and actual != size:
            return f"{place}/{name} has {actual} bytes, its completion marker says {size}"
    return None
