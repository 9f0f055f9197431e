"""Writing files so that a refused write names its file and errno, and their modes follow the umask."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, cast

import torch

from cae2.errors import naming


class _KeepsWriteError(io.RawIOBase):
    """A file for torch.save that remembers the OSError of a refused write: torch's zip writer turns it
    into a RuntimeError ("unexpected pos 64 vs 0") without the errno."""

    def __init__(self, file):
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """torch.save to `path` through a Python file: a write the file system refuses (EIO, ENOSPC) raises its
    OSError naming the file, where torch.save(obj, path) reports only "unexpected pos" or "iostream error"."""
    with naming(path), open(path, "wb") as f:
        sink = _KeepsWriteError(f)
        try:
            torch.save(obj, cast(Any, sink))  # a file-like object (torch's FileLike): torch writes through it
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with naming(path):
        Path(path).write_bytes(data)


def write_atomically(path: Path, text: str) -> None:
    """`path` holds the old text or the new, never a part: a temporary file beside it, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp):
        tmp.write_text(text)
    with naming(path):
        os.replace(tmp, path)


def follow_umask(paths) -> None:
    """Give files the mode the process's umask asks for (0644 under umask 022): safetensors writes its
    files through a temporary file of mode 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o666 & ~mask)


def fsync_dir(path: Path) -> None:
    """Make the names in `path` durable (a rename or a new file survives a power cut)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
