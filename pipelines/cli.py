"""The `cae2` command line. Every stage is a subcommand; `cae2 --help` lists them."""

from __future__ import annotations

import dataclasses
import json
import sys
from enum import Enum
from typing import Annotated

import typer

import cae2
from cae2.errors import UserError

app = typer.Typer(
    name="cae2",
    help="CAE v2 distillation of CLIP into ViTs, with an offline CLIP target cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cae2 {cae2.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _jsonable(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def preset_record(name: str) -> dict:
    preset = cae2.get_preset(name)
    import torch

    with torch.device("meta"):  # shapes only: parameter counts without allocating weights
        model = cae2.create_model(name)
    cfg = preset.model
    return {
        "name": name,
        "description": preset.description,
        "model": {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        | {"grid_size": list(cfg.grid_size), "num_masked": cfg.num_masked, "mask_ratio": round(cfg.mask_ratio, 4)},
        "train": {f.name: _jsonable(getattr(preset.train, f.name)) for f in dataclasses.fields(preset.train)},
        "params": {
            "total": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "encoder": sum(p.numel() for p in model.encoder.parameters() if p.requires_grad),
        },
    }


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print every field as JSON.")] = False,
) -> None:
    """List the model presets with their architecture, training defaults and parameter counts.

    Example: cae2 models --json
    """
    records = [preset_record(n) for n in cae2.list_presets()]
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    header = f"{'name':<16}{'dim':>6}{'depth':>6}{'heads':>6}{'reg d/w/h':>12}{'masked':>8}{'drop':>6}" \
             f"{'enc params':>12}{'total':>12}"
    typer.echo(header)
    for r in records:
        m = r["model"]
        reg = f"{m['regressor_depth']}/{m['regressor_dim']}/{m['regressor_heads']}"
        typer.echo(f"{r['name']:<16}{m['embed_dim']:>6}{m['depth']:>6}{m['num_heads']:>6}{reg:>12}"
                   f"{m['num_masked']:>5}/{m['grid_size'][0] * m['grid_size'][1]:<3}{m['drop_path']:>5}"
                   f"{r['params']['encoder'] / 1e6:>11.1f}M{r['params']['total'] / 1e6:>11.1f}M")


def main() -> None:
    """Console-script entry: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except UserError as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
