"""The shape of the code, read with `ast`: imports run one way, no private names cross packages, imports
sit at the top of their file, and no function grows past 60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cae2", "targets", "pipelines", "bench")
MAX_FUNCTION_LINES = 60

# Which first-party packages each package may import (imports flow one way; stages share only through
# targets/, cae2/ and pipelines' shared modules). `pipelines` here means its top-level modules.
ALLOWED = {
    "cae2": {"cae2"},
    "targets": {"cae2", "targets"},
    "pipelines.extract": {"cae2", "targets", "pipelines", "pipelines.extract"},
    "pipelines.pretrain": {"cae2", "targets", "pipelines", "pipelines.pretrain"},
    "pipelines.evaluate": {"cae2", "targets", "pipelines", "pipelines.evaluate"},
    "pipelines.inspect": {"cae2", "targets", "pipelines", "pipelines.inspect"},
    "bench": {"cae2", "targets", "pipelines", "pipelines.extract", "pipelines.pretrain", "pipelines.evaluate",
              "pipelines.inspect", "bench"},
}
SHARED = {"pipelines.checkpoint", "pipelines.files", "pipelines.logs", "pipelines.options", "pipelines.pictures",
          "pipelines.run_loop",
          "pipelines.run_dirs", "pipelines.runs", "pipelines.shards", "pipelines.weights"}


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out.append((name, path, ast.parse(path.read_text())))
    return out


def _package(module: str) -> str:
    """The room a module lives in: cae2, targets, pipelines (its top-level files) or pipelines.<stage>."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipelines" and len(parts) > 2 else parts[0]


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every first-party import."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
    return out


MODULES = _modules()


@pytest.mark.parametrize(("name", "path", "tree"), MODULES, ids=[m[0] for m in MODULES])
def test_imports_flow_one_way(name, path, tree):
    room = _package(name)
    allowed = ALLOWED.get(room)
    for module, names, line in _imports(tree):
        target = _package(module)
        if target == "pipelines" and module not in SHARED and module != "pipelines" and room not in ("pipelines",
                                                                                                    "bench"):
            pytest.fail(f"{path}:{line} imports {module}: a stage imports only pipelines' shared modules")
        if allowed is not None:
            assert target in allowed, f"{path}:{line}: {room} must not import {module}"
        for n in names:
            assert not (n.startswith("_") and not n.startswith("__") and target != room), \
                f"{path}:{line} imports the private name {n} of {module}"


@pytest.mark.parametrize(("name", "path", "tree"), MODULES, ids=[m[0] for m in MODULES])
def test_imports_at_the_top_and_functions_short(name, path, tree):
    lines = path.read_text().splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} has {length} lines"
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import | ast.ImportFrom):
                said = "deferred" in lines[inner.lineno - 1] or "deferred" in lines[inner.lineno - 2]
                assert said, f"{path}:{inner.lineno}: an import inside {node.name} needs a comment saying why"


def test_no_stage_imports_stage_one():
    offenders = [(name, module) for name, _, tree in MODULES
                 if _package(name) in ("pipelines.pretrain", "pipelines.evaluate")
                 for module, _, _ in _imports(tree) if module.startswith("pipelines.extract")]
    assert not offenders


def test_the_architecture_map_names_every_file():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(path.relative_to(ROOT)) for _, path, _ in MODULES
               if path.name != "__init__.py" and f"`{path.name}`" not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"
