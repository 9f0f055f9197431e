"""Every value is checked before any work starts: each field of every command is tried just outside its
constraint (on the command line and in a config file), and must give one line naming the option, exit
status 2, and nothing written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cae2.fields import OneOf, PathKind, Range
from pipelines import options
from pipelines.cli import EXTRACT_FLAGS, ModelsConfig, run
from pipelines.demo import DemoConfig
from pipelines.evaluate.config import KnnConfig, LinearConfig
from pipelines.evaluate.finetune_config import FinetuneConfig
from pipelines.extract.config import ExtractConfig
from pipelines.extract.convert import ConvertConfig
from pipelines.extract.verify import VerifyConfig
from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.export import ExportConfig
from pipelines.shards import MakeShardsConfig

COMMANDS = {
    ("extract-targets",): (ExtractConfig, EXTRACT_FLAGS),
    ("pretrain",): (TrainConfig, {}),
    ("evaluate", "knn"): (KnnConfig, {}),
    ("evaluate", "linear"): (LinearConfig, {}),
    ("evaluate", "finetune"): (FinetuneConfig, {}),
    ("convert-targets",): (ConvertConfig, {}),
    ("verify-targets",): (VerifyConfig, {}),
    ("export",): (ExportConfig, {}),
    ("make-shards",): (MakeShardsConfig, {}),
    ("demo",): (DemoConfig, {}),
    ("models",): (ModelsConfig, {"as_json": "--json"}),
}


@pytest.fixture
def places(tmp_path):
    """A folder, a file and a missing path, for the values of path options."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    return {"dir": tmp_path / "folder", "file": tmp_path / "file.txt", "missing": tmp_path / "missing"}


def _good(opt: options.Option, places) -> str:
    """A value the option accepts (for the options a test is not about)."""
    for c in opt.checks:
        if isinstance(c, PathKind):
            return str({"file": places["file"], "dir": places["dir"], "new_file": places["dir"] / "out.json",
                        "out_dir": places["dir"] / "new"}[c.kind])
    return str(places["dir"])


def _bad_values(opt: options.Option, places) -> list[str]:
    """Values just outside the option's constraints."""
    out = []
    for c in opt.checks:
        if isinstance(c, Range):
            step = 1 if opt.type is int else 1e-3
            if c.min is not None:
                out.append(str(c.min if c.open_min else (math.floor(c.min) - 1 if opt.type is int else c.min - step)))
            if c.max is not None:
                out.append(str(c.max if c.open_max else c.max + step))
        elif isinstance(c, OneOf):
            out.append("not-a-choice")
        elif isinstance(c, PathKind):
            out.append(str({"file": places["dir"], "dir": places["file"], "new_file": places["dir"],
                            "out_dir": places["file"]}[c.kind]))
    return out


def _argv(command: tuple[str, ...], opts: list[options.Option], given: dict[str, str], places) -> list[str]:
    argv, positional = [*command], []
    for opt in opts:
        value = given.get(opt.flag)
        if value is None and opt.default is options.dataclasses.MISSING:
            value = _good(opt, places)
        if value is None:
            continue
        if opt.argument:
            positional.append(value)
        else:
            argv += [opt.flag, value]
    return [*argv, *positional]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cases():
    for command, (cls, names) in COMMANDS.items():
        for opt in options.options(cls, names):
            if any(isinstance(c, Range | OneOf | PathKind) for c in opt.checks):
                yield pytest.param(command, cls, names, opt.flag, id=f"{' '.join(command)} {opt.flag}")


@pytest.mark.parametrize(("command", "cls", "names", "flag"), list(_cases()))
def test_a_value_outside_its_constraint_is_one_line_and_nothing_is_written(command, cls, names, flag, places,
                                                                          tmp_path, capsys):
    opts = options.options(cls, names)
    opt = next(o for o in opts if o.flag == flag)
    before = _tree(tmp_path)
    for bad in _bad_values(opt, places):
        status = run(_argv(command, opts, {flag: bad}, places))
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2, (flag, bad, err)
        assert len(err) == 1 and err[0].startswith("error:") and opt.name in err[0], (flag, bad, err)
        assert _tree(tmp_path) == before, (flag, bad)


WRONG_TYPES = {bool: "false", int: "four", float: "x"}


@pytest.mark.parametrize("command", [("extract-targets",), ("pretrain",), ("evaluate", "knn"), ("evaluate", "linear"),
                                     ("evaluate", "finetune")], ids=" ".join)
def test_config_file_values_of_another_type_are_refused_naming_the_key(command, places, tmp_path, capsys):
    cls, names = COMMANDS[command]
    opts = options.options(cls, names)
    before = _tree(tmp_path)
    for opt in opts:
        bad = WRONG_TYPES.get(opt.type) or ("0.3" if options.typing.get_origin(opt.type) is tuple else None)
        if bad is None:
            continue
        config = places["dir"] / "options.yaml"
        value = f'"{bad}"' if opt.type is not tuple and bad != "0.3" else bad
        config.write_text(f"{opt.flag[2:]}: {value}\n")  # a quoted "false" is a string, not a boolean
        status = run(_argv(command, opts, {"--config": str(config)}, places) + ["--config", str(config)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and opt.flag[2:] in err[0] and "--config" in err[0], (opt.flag, err)
        config.unlink()
    assert _tree(tmp_path) == before
