"""Options are declared once (config dataclass fields); the commands are generated from them."""

import dataclasses
from dataclasses import dataclass, field

import pytest
import typer
from typer.testing import CliRunner

from cae2.config import LossKind
from pipelines import options
from pipelines.cli import EXTRACT_FLAGS, app
from pipelines.extract.config import ExtractConfig
from pipelines.pretrain.config import TrainConfig
from targets.teacher import TeacherSpec
from targets.views import ViewSettings

ENV = {"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}


def _help(*args) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env=ENV)
    assert res.exit_code == 0, res.output
    return res.output


def _flags(command: str) -> set[str]:
    params = typer.main.get_command(app).commands[command].params
    return {flag for p in params for flag in (*p.opts, *p.secondary_opts)} | {"--help"}


def test_every_field_is_one_option_with_its_docstring():
    for command, cls, names in (("pretrain", TrainConfig, {}), ("extract-targets", ExtractConfig, EXTRACT_FLAGS)):
        opts = options.options(cls, names)
        leaves = {f.name for f in dataclasses.fields(cls) if f.name not in ("teacher", "views")}
        if cls is ExtractConfig:
            leaves |= {f"teacher.{f.name}" for f in dataclasses.fields(TeacherSpec)} - {"teacher.init_seed"}
            leaves |= {f"views.{f.name}" for f in dataclasses.fields(ViewSettings)}
        assert {".".join(o.path) for o in opts} == leaves, command  # one option per field, no other
        assert len({o.flag for o in opts}) == len(opts)
        assert all(o.help for o in opts), [o.flag for o in opts if not o.help]  # every field documents itself
        flags = _flags(command)
        bools = {f"--no-{o.flag[2:]}" for o in opts if o.type is bool}
        assert flags == {o.flag for o in opts} | bools | {"--config", "--help"}, command
    assert {"--no-compile", "--no-teacher-online", "--no-allow-random-teacher", "--no-log-keys"} <= _flags("pretrain")
    extract = _flags("extract-targets")
    assert {"--teacher", "--views", "--download", "--no-quick-gelu", "--brightness", "--crop-scale"} <= extract


def test_help_shows_the_presets_real_defaults():
    text = " ".join(_help("pretrain").split())
    assert "Default: the preset's: 300 (vit_tiny, vit_small, vit_base, vit_large); 10 (debug)" in text
    assert "0.2 (vit_large)" in text  # drop path differs by preset
    assert "[default: (64)]" in text and "300 for every" not in text


@dataclass(kw_only=True)
class Inner:
    depth: int = 3
    """How deep."""


@dataclass(kw_only=True)
class Demo:
    path: str
    """Where."""
    fast: bool = False
    """Go fast."""
    loss: LossKind = LossKind.cosine
    """Token distance."""
    scale: tuple[float, float] = (0.4, 1.0)
    """Two floats."""
    inner: Inner = field(default_factory=Inner)


def _capturing(name: str, cls, **kwargs) -> tuple[typer.Typer, list]:
    """An app with one generated command that records the config it is called with."""
    got = []
    cli = typer.Typer()
    cli.callback()(lambda: None)

    def run(cfg):
        """Capture."""
        got.append(cfg)

    options.command(cli, name, cls, run, **kwargs)
    return cli, got


@pytest.fixture
def demo():
    return _capturing("demo", Demo, names={"inner.depth": "--depth"})


def test_flags_override_the_config_file_and_booleans_turn_off(demo, tmp_path):
    cli, got = demo
    (tmp_path / "c.yaml").write_text("path: /data\nfast: true\nloss: mse\nscale: [0.2, 0.9]\ndepth: 5\n")
    res = CliRunner().invoke(cli, ["demo", "--config", str(tmp_path / "c.yaml"), "--no-fast"])
    assert res.exit_code == 0, res.output
    assert got[-1] == Demo(path="/data", fast=False, loss=LossKind.mse, scale=(0.2, 0.9), inner=Inner(depth=5))
    res = CliRunner().invoke(cli, ["demo", "--path", "p", "--fast", "--depth", "7"])
    assert res.exit_code == 0 and got[-1] == Demo(path="p", fast=True, inner=Inner(depth=7))


def test_bad_options_give_one_clear_line(demo, tmp_path):
    cli, _ = demo
    res = CliRunner().invoke(cli, ["demo"])
    assert res.exit_code != 0 and "--path is required" in str(res.exception)
    (tmp_path / "c.toml").write_text('path = "x"\nspeed = 3\n')
    res = CliRunner().invoke(cli, ["demo", "--config", str(tmp_path / "c.toml")])
    assert "unknown option(s) speed" in str(res.exception)


def test_extract_targets_takes_a_config_file(tmp_path):
    (tmp_path / "x.yaml").write_text(f"shards: {tmp_path}/none-*.tar\nout: {tmp_path}/o.zarr\nviews: 3\n"
                                     "teacher: cae2-tiny-clip\npretrained: none\nworkers: 0\n")
    res = CliRunner().invoke(app, ["extract-targets", "--config", str(tmp_path / "x.yaml")])
    assert res.exit_code != 0 and "--shards" in str(res.exception) and "none-*.tar" in str(res.exception)


@pytest.fixture
def train_cli():
    return _capturing("pretrain", TrainConfig)


def test_config_files_read_as_users_mean_yaml_1_2_and_home(train_cli, tmp_path, monkeypatch):
    cli, got = train_cli
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "c.yaml").write_text("shards: s.tar\ntargets: t.zarr\nmixed-precision: no\nlr: 5e-4\nout: ~/run\n")
    res = CliRunner().invoke(cli, ["pretrain", "--config", str(tmp_path / "c.yaml")])
    assert res.exit_code == 0, res.output
    cfg = got[-1]
    assert (cfg.mixed_precision, cfg.lr, cfg.out) == ("no", 5e-4, str(tmp_path / "home" / "run"))


@pytest.mark.parametrize(("text", "says"), [
    ("out: ~\n", "out in --config"),                   # null: no value
    ("batch-size:\n", "batch-size in --config"),
    ("batch-size: 4\nbatch_size: 2\n", "batch-size and batch_size are one option (--batch-size)"),
    ("batch-size: 4\nbatch-size: 2\n", "key 'batch-size' is given twice (line 4)"),
])
def test_config_file_mistakes_are_one_line_naming_the_key(train_cli, tmp_path, text, says):
    cli, got = train_cli
    (tmp_path / "c.yaml").write_text("shards: s.tar\ntargets: t.zarr\n" + text)
    res = CliRunner().invoke(cli, ["pretrain", "--config", str(tmp_path / "c.yaml")])
    assert res.exit_code != 0 and not got
    message = str(res.exception)
    assert says in message and "\n" not in message, message
