"""What a config field accepts, declared beside its type: `batch_size: Annotated[int, Range(min=1)] = 64`.

The command line (`pipelines.options`) reads these to build each option, and `check_fields` refuses a
value outside them wherever a config is built (flags, config files, code), naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from cae2.errors import UserError


@dataclass(frozen=True)
class Argument:
    """A positional command-line argument instead of an option."""


@dataclass(frozen=True)
class Switch:
    """A boolean flag that only turns the option on (no --no- form)."""


@dataclass(frozen=True)
class Range:
    """A number in [min, max]; `open_min`/`open_max` exclude the bound."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def problem(self, value) -> str | None:
        if value is None or isinstance(value, bool):
            return None
        if not math.isfinite(value):
            return "must be a finite number"
        low = self.min is not None and (value <= self.min if self.open_min else value < self.min)
        high = self.max is not None and (value >= self.max if self.open_max else value > self.max)
        return f"must be {self.describe()}" if low or high else None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"in {'(' if self.open_min else '['}{self.min:g}, {self.max:g}{')' if self.open_max else ']'}"
        if self.min is not None:
            return f"{'>' if self.open_min else '>='} {self.min:g}"
        return f"{'<' if self.open_max else '<='} {self.max:g}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def problem(self, value) -> str | None:
        if value is None or value in self.choices:
            return None
        return f"must be one of {', '.join(self.choices)}"


@dataclass(frozen=True)
class PathKind:
    """What a path must be, checked before any work: `file` (an existing file), `dir` (an existing
    directory), `new_file` (a file to write: not a directory, in a folder that is or can be made
    writable), `out_dir` (a directory to write: not a file, somewhere writable)."""

    kind: str

    def problem(self, value) -> str | None:
        if value is None or "://" in str(value):
            return None
        path = Path(value)
        if self.kind == "file":
            return None if path.is_file() else "is a directory; pass a file" if path.is_dir() else "does not exist"
        if self.kind == "dir":
            return None if path.is_dir() else "is a file; pass a directory" if path.exists() else "does not exist"
        if path.is_dir() and self.kind == "new_file":
            return "is a directory; pass the path of a file to write"
        if path.exists() and not path.is_dir() and self.kind == "out_dir":
            return "is a file; pass a directory (new or existing)"
        return _unwritable(path)


def _unwritable(path: Path) -> str | None:
    """Why nothing could be written at `path` (its nearest existing folder), or None."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot be created: {folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot be written: {folder} is not writable"
    return None


@functools.cache
def constraints(cls) -> dict[str, tuple]:
    """{field name: the constraint objects in its Annotated type} of a dataclass (read once per class)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        out[f.name] = tuple(typing.get_args(tp)[1:]) if typing.get_origin(tp) is typing.Annotated else ()
    return out


def field_problems(obj) -> list[tuple[str, str]]:
    """[(field name, what is wrong)] of a dataclass instance against its fields' constraints (values,
    not paths: those are checked where a command starts)."""
    problems = []
    for name, checks in constraints(type(obj)).items():
        value = getattr(obj, name)
        for check in checks:
            problem = None if isinstance(check, PathKind) or not hasattr(check, "problem") else check.problem(value)
            if problem:
                problems.append((name, f"{problem}, not {value!r}"))
    return problems


def check_fields(obj) -> None:
    """Raise UserError for the first field of `obj` outside its constraints (configs built in code)."""
    problems = field_problems(obj)
    if problems:
        name, problem = problems[0]
        raise UserError(f"{type(obj).__name__}.{name} {problem}")
