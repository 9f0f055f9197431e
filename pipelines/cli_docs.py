"""docs/cli.md, generated from the Typer help so that it cannot drift: `python -m pipelines.cli_docs`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from pipelines.cli import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
ENV = {"COLUMNS": "110", "TERM": "dumb", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env=ENV, prog_name="cae2")
    if result.exit_code != 0:
        raise RuntimeError(f"cae2 {' '.join(args)} --help failed: {result.output}")
    return "\n".join(line.rstrip() for line in result.output.strip().splitlines())


def render() -> str:
    group = typer.main.get_command(app)
    parts = ["# CLI reference", "", "Generated from `cae2 --help` by `python -m pipelines.cli_docs`; a test keeps it "
             "in sync.", "", "```text", _help([]), "```"]
    for name in group.list_commands(None):  # type: ignore[arg-type]
        sub = group.get_command(None, name)  # type: ignore[arg-type]
        names = [[name, s] for s in sub.list_commands(None)] if hasattr(sub, "list_commands") else [[name]]
        for args in names:  # a group (`cae2 evaluate`) is documented by its subcommands
            parts += ["", f"## cae2 {' '.join(args)}", "", "```text", _help(args), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
