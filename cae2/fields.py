"""What a config field accepts, declared beside its type: `batch_size: Annotated[int, Range(min=1)] = 64`.

The command line (`pipelines.options`) reads these to build each option, and `check_fields` refuses a
value outside them wherever a config is built (flags, config files, code), naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass


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


def constraints(cls) -> dict[str, tuple]:
    """{field name: the constraint objects in its Annotated type} of a dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union or type(tp).__name__ == "UnionType":
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        out[f.name] = tuple(typing.get_args(tp)[1:]) if typing.get_origin(tp) is typing.Annotated else ()
    return out


def field_problems(obj) -> list[tuple[str, str]]:
    """[(field name, what is wrong)] of a dataclass instance against its fields' constraints."""
    problems = []
    for name, checks in constraints(type(obj)).items():
        value = getattr(obj, name)
        for check in checks:
            problem = check.problem(value) if hasattr(check, "problem") else None
            if problem:
                problems.append((name, f"{problem}, not {value!r}"))
    return problems
