"""Command-line options generated from the config dataclasses, so that each option is declared once:
as a field, with its type, its default and its docstring.

Nested config dataclasses (the teacher, the view settings) contribute their fields too, under the
flag names the command gives them. Booleans get `--x/--no-x`, so a value from a config file can be
turned off on the command line. Every command built here also reads its options from a YAML or TOML
file (`--config`, keys as flag names or field names); flags override the file, the file overrides
the dataclass defaults. YAML is read as YAML 1.2 (`no` is a string, `5e-4` a number), `~/x` is the home
folder, and an empty value or one option spelt twice is refused, naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, cast

import typer
import yaml

from cae2.errors import UserError
from cae2.fields import Argument, PathKind, Range, Switch, constraints
from targets.storage_settings import StorageSettings


@dataclass(frozen=True)
class Option:
    path: tuple[str, ...]
    """Field path in the config, e.g. ("teacher", "name")."""
    flag: str
    type: Any
    """The field's type without None."""
    default: Any
    """dataclasses.MISSING: required."""
    help: str
    checks: tuple = ()
    """The field's constraints (`cae2.fields`: Argument, Range, OneOf)."""

    @property
    def argument(self) -> bool:
        return any(isinstance(c, Argument) for c in self.checks)

    @property
    def name(self) -> str:
        """How errors name it: the flag, or a positional argument's metavar (STORE)."""
        return self.path[-1].upper() if self.argument else self.flag

    @property
    def param(self) -> str:
        return "__".join(self.path)


def field_docs(cls) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (`x: int = 0` then `\"\"\"...\"\"\"`), its base
    classes' included."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(cast(type, klass)))).body[0]
        body = tree.body if isinstance(tree, ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _repeatable(tp) -> bool:
    """tuple[str, ...]: a flag given any number of times."""
    return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, Ellipsis)


def _strip_none(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def options(cls, names: dict[str, str | None] | None = None, prefix: tuple[str, ...] = ()) -> list[Option]:
    """The options of a config dataclass. `names` maps dotted field paths to flags (None: not an option);
    other fields are `--field-name`."""
    names = names or {}
    hints, docs, checks = typing.get_type_hints(cls), field_docs(cls), constraints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        dotted = ".".join(path)
        if dotted in names and names[dotted] is None:
            continue
        tp = _strip_none(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out += options(tp, names, path)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        flag = names.get(dotted) or _flag(f.name)
        out.append(Option(path, flag, tp, default, docs.get(f.name, ""), checks[f.name]))
    return out


def _convert(opt: Option, value, where: str):
    """A config-file value -> the field's type; a value of another type is refused (a quoted "false" is a
    string, not a boolean), naming the option. An empty value (`key:`, `key: ~`) is refused unless the
    field's default is empty; a path starting with `~` is the user's home, as in a shell."""
    tp = opt.type

    def refuse(expected: str):
        got = "an empty value (null)" if value is None else f"{type(value).__name__} {value!r}"
        raise UserError(f"{opt.flag[2:]} in {where}: expected {expected}, got {got}; give a value or delete the line")

    if value is None:
        return None if opt.default is None else refuse(_expected(opt))

    if tp is bool:
        return value if isinstance(value, bool) else refuse("true or false (unquoted)")
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else refuse("a whole number")
    if tp is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else refuse("a number")
    if isinstance(tp, type) and issubclass(tp, Enum):
        choices = [m.value for m in tp]
        return tp(value) if value in choices else refuse(f"one of {', '.join(map(str, choices))}")
    if _repeatable(tp):
        items = [value] if isinstance(value, str) else value
        ok = isinstance(items, list | tuple) and all(isinstance(v, str) for v in items)
        return tuple(items) if ok else refuse("a string or a list of strings")
    if typing.get_origin(tp) is tuple:
        n = len(typing.get_args(tp))
        ok = isinstance(value, list | tuple) and len(value) == n and \
            all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        return tuple(float(v) for v in value) if ok else refuse(f"a list of {n} numbers")
    if tp in (str, Path):
        ok = isinstance(value, str | int | float) and not isinstance(value, bool)
        text = os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else str(value)
        return tp(text) if ok else refuse("a string")
    return value


def _expected(opt: Option) -> str:
    tp = opt.type
    if isinstance(tp, type) and issubclass(tp, Enum):
        return f"one of {', '.join(str(m.value) for m in tp)}"
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(tp, "a value")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML read as YAML 1.2 reads it: only true/false are booleans (`no`, `off`, `yes` stay strings, so
    `mixed-precision: no` means "no"), `5e-4` is a number, and a key given twice is refused."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool",
                                                                       "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def check(opt: Option, value) -> None:
    """Refuse a value outside the option's constraints, naming the option."""
    for constraint in opt.checks:
        problem = constraint.problem(value) if hasattr(constraint, "problem") else None
        if problem and isinstance(constraint, PathKind):
            raise UserError(f"{opt.name} {value} {problem}")
        if problem:
            raise UserError(f"{opt.name} {problem}, not {value.value if isinstance(value, Enum) else value!r}")


def build(cls, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = ()):
    """A (nested) config from {field path: value}; missing fields take their defaults."""
    hints, kwargs = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        tp = _strip_none(hints[f.name])
        if dataclasses.is_dataclass(tp):
            if any(p[:len(path)] == path for p in values):
                kwargs[f.name] = build(tp, values, path)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def load_config_file(path: Path) -> dict:
    """Options from a YAML or TOML file: {name: value}."""
    if not path.is_file():
        what = "is a directory; pass a YAML or TOML file" if path.is_dir() else "does not exist"
        raise UserError(f"--config {path} {what}")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_Yaml12Loader) or {}
    except yaml.MarkedYAMLError as e:
        line = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise UserError(f"--config {path} cannot be parsed: {e.problem or e.context}{line}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--config {path} cannot be parsed: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option names to values")
    return data


def _parameter(opt: Option, default_help: Callable[[Option], str | None] | None,
               config_file: bool) -> inspect.Parameter:
    """The Typer parameter of an option. With a config file, every flag defaults to None (not given:
    the file's value, else the field's default) and the help shows the field's default."""
    help_text = opt.help
    extra = default_help(opt) if default_help else None
    if extra:
        help_text = f"{help_text} {extra}".strip()
    show = None if opt.default in (None, dataclasses.MISSING) else str(
        list(opt.default) if isinstance(opt.default, tuple) else
        opt.default.value if isinstance(opt.default, Enum) else opt.default)
    required = opt.default is dataclasses.MISSING
    default = None if config_file or required else opt.default
    if opt.argument:
        if required:
            return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY,
                                     annotation=Annotated[opt.type, typer.Argument(help=help_text)])
        annotation = Annotated[opt.type | None, typer.Argument(help=help_text, show_default=show or False)]
        return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    if required:
        help_text += " [required]"
    switch = any(isinstance(c, Switch) for c in opt.checks)
    decl = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.type is bool and not switch else opt.flag
    kwargs = {"help": help_text, "show_default": (show if show is not None else False) if config_file else True}
    for check in opt.checks:
        if isinstance(check, Range) and not (check.open_min or check.open_max):
            kwargs |= {k: v for k, v in (("min", check.min), ("max", check.max)) if v is not None}
    if _repeatable(opt.type):
        annotation = Annotated[list[str] | None, typer.Option(decl, **kwargs)]
        return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
    annotation = Annotated[opt.type | None, typer.Option(decl, **kwargs)]
    return inspect.Parameter(opt.param, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def command(app: typer.Typer, name: str, cls, run: Callable, *, names: dict[str, str | None] | None = None,
            default_help: Callable[[Option], str | None] | None = None, config_file: bool = True) -> list[Option]:
    """Register `cae2 NAME`: the options of `cls` (and --config, unless config_file is False); calls
    run(config). `run`'s docstring is the command's help."""
    opts = options(cls, names)
    by_key = {}
    for opt in opts:
        by_key[opt.flag[2:]] = by_key[opt.flag[2:].replace("-", "_")] = by_key[".".join(opt.path)] = opt

    def impl(**given):
        config = given.pop("config", None)
        from_file = load_config_file(config) if config else {}
        unknown = sorted(str(k) for k in from_file if str(k) not in by_key)
        if unknown:
            raise UserError(f"--config {config}: unknown option(s) {', '.join(unknown)} (known: "
                            f"{', '.join(o.flag[2:] for o in opts)})")
        spellings: dict[str, list[str]] = {}
        for k in from_file:
            spellings.setdefault(by_key[str(k)].flag, []).append(str(k))
        for flag, keys in spellings.items():
            if len(keys) > 1:
                raise UserError(f"--config {config}: {' and '.join(keys)} are one option ({flag}); keep one of them")
        values = {by_key[str(k)].path: _convert(by_key[str(k)], v, f"--config {config}") for k, v in from_file.items()}
        values |= {opt.path: tuple(given[opt.param]) if _repeatable(opt.type) else given[opt.param]
                   for opt in opts if given[opt.param] not in (None, [])}
        missing = [o.flag for o in opts if o.default is dataclasses.MISSING and o.path not in values]
        if missing:
            raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (on the command "
                            "line or in --config)")
        for opt in opts:  # every value within its field's constraints, before any work
            if opt.path in values:
                check(opt, values[opt.path])
        try:
            cfg = build(cls, values)
        except (ValueError, TypeError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{name}: {e}") from None
        if isinstance(cfg, StorageSettings):
            cfg.apply_storage()
        return run(cfg)

    params = [_parameter(o, default_help, config_file) for o in opts]
    if config_file:
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option(help="YAML/TOML file of options (flag or field names); flags override it.")]))
    impl.__signature__ = inspect.Signature(params)
    impl.__annotations__ = {}
    impl.__doc__ = run.__doc__
    impl.__name__ = run.__name__
    app.command(name)(impl)
    return opts
