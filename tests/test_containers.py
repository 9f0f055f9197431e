"""The Docker images, built and run: docker/build.sh makes a Debian base with debootstrap (no registry), builds
cae2:cpu from a wheelhouse of the tested torch, and the container runs the demo and extract-targets (a mounted
shard folder, and the local S3 server) as its non-root user, writing to mounted volumes that the host then reads.
cae2:gpu is built from the same base and starts. Podman, debootstrap and runc are installed here when missing.

The base tarball and the wheelhouse are kept in ~/.cache/cae2 and podman keeps its layers, so a second run on a
machine takes a minute or two; the first one about five."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import zarr

from bench.s3_server import BUCKET
from cae2 import resolve_model_config
from cae2.encoder import timm_kwargs
from pipelines.shards import make_shards
from targets.store import TargetStore
from tests.fixtures import TINY_TEACHER, write_good_images

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
CACHE = Path(os.environ.get("CAE2_TEST_CACHE", Path.home() / ".cache" / "cae2"))
# Podman on a host with hybrid cgroups (crun refuses them) and ulimits tighter than podman's defaults.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""


def _install_tools() -> str | None:
    """Why podman cannot be used here, or None once podman, debootstrap and runc are installed."""
    missing = [t for t in ("podman", "debootstrap", "runc") if shutil.which(t) is None]
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed, and installing needs root and apt-get"
    install = ["apt-get", "install", "-y", "-q", "podman", "debootstrap", "runc"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        res = subprocess.run(install, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            return f"apt-get could not install podman, debootstrap and runc: {res.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """The environment podman runs with here; the test is skipped, saying why, where it cannot be installed."""
    why = _install_tools()
    if why:
        pytest.skip(why)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(conf), CAE2_ENGINE="podman",
               CAE2_DOCKER_CACHE=str(CACHE / "docker"), PYTHON=sys.executable)
    return env


def run(args: list[str], env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)}: status {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def cpu_image(podman):
    res = run(["bash", str(ROOT / "docker" / "build.sh"), "cpu", "--local-base", "--wheelhouse",
               str(CACHE / "wheelhouse")], podman)
    assert res.stdout.strip().startswith("cae2:cpu\t") and res.stdout.strip().endswith(" MB"), res.stdout
    return "cae2:cpu"


def writable(path: Path) -> Path:
    """A host folder the container's user (uid 1000) can write: a volume as a cluster job mounts it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def test_cpu_image_runs_the_demo_as_its_user_into_a_mounted_volume(podman, cpu_image, tmp_path):
    out = writable(tmp_path / "out")
    run(["podman", "run", "--rm", "-v", f"{out}:/out", cpu_image, "demo", "--out", "/out/demo"], podman)
    demo = out / "demo"
    assert (demo / "encoder.safetensors").stat().st_uid == 1000  # written by the image's non-root user
    group = zarr.open_group(str(demo / "targets.zarr"), mode="r")  # plain zarr reads the store
    assert group.attrs["cae2"]["teacher"]["name"] == TINY_TEACHER
    unit = next(iter(group["units"].group_values()))
    assert unit["latents"].dtype == "float16" and unit.attrs["complete"]["num_samples"] > 0
    model = timm.models.VisionTransformer(**timm_kwargs(resolve_model_config("cae2_debug")))
    model.load_state_dict(safetensors.torch.load_file(str(demo / "encoder.safetensors")), strict=True)


def test_cpu_image_extracts_targets_from_a_mounted_shard_folder(podman, cpu_image, tmp_path):
    write_good_images(tmp_path / "images", 12, seed=3)
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=6)
    out = writable(tmp_path / "out")
    res = run(["podman", "run", "--rm", "-v", f"{tmp_path / 'shards'}:/data:ro", "-v", f"{out}:/out", cpu_image,
               "extract-targets", "--shards", "/data", "--out", "/out/t.zarr", "--teacher", TINY_TEACHER,
               "--pretrained", "none", "--views", "2", "--workers", "0", "--no-progress"], podman)
    assert "units: 2 written" in res.stdout + res.stderr
    store = TargetStore.open(out / "t.zarr")
    assert sorted(store.unit_names()) == ["shard-000000.tar", "shard-000001.tar"]
    assert all(store.marker(u)["num_valid"] == 6 for u in store.unit_names())


def test_cpu_image_extracts_into_the_s3_server(podman, cpu_image, tmp_path, s3_server, bucket):
    write_good_images(tmp_path / "images", 6, seed=4)
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=6)
    env_args = [a for k, v in s3_server.env.items() for a in ("-e", k)]  # values from the environment, not argv
    run(["podman", "run", "--rm", "--network", "host", *env_args, "-v", f"{tmp_path / 'shards'}:/data:ro",
         cpu_image, "extract-targets", "--shards", "/data", "--out", f"{bucket}/t.zarr", "--teacher", TINY_TEACHER,
         "--pretrained", "none", "--views", "1", "--workers", "0", "--no-progress"], dict(podman, **s3_server.env))
    store = TargetStore.open(f"{bucket}/t.zarr")
    assert store.marker("shard-000000.tar")["num_valid"] == 6
    assert bucket.startswith(f"s3://{BUCKET}/")


def test_image_has_no_secrets_and_the_documented_start_up(podman, cpu_image, s3_server):
    # The S3 credentials are in the environment of the build (the s3_server fixture sets them in this
    # process): none may reach the image's history or its configuration.
    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    history = run(["podman", "history", "--no-trunc", "--format", "{{.CreatedBy}}", cpu_image], podman).stdout
    config = run(["podman", "image", "inspect", cpu_image], podman).stdout
    for text in (history, config):
        assert secret not in text and "AWS_SECRET_ACCESS_KEY=" not in text and "AWS_ACCESS_KEY_ID=" not in text
    script = "id -u; mkdir -p $HF_HOME/hub $TORCH_HOME && touch $HF_HOME/hub/x $TORCH_HOME/y /cache/z && echo writable"
    who = run(["podman", "run", "--rm", "--entrypoint", "sh", cpu_image, "-c", script], podman).stdout.split()
    assert who == ["1000", "writable"]
    assert run(["podman", "run", "--rm", cpu_image, "--version"], podman).stdout.startswith("cae2 ")


def test_gpu_image_builds_from_the_same_base_and_starts(podman, cpu_image):
    res = run(["bash", str(ROOT / "docker" / "build.sh"), "gpu", "--local-base", "--wheelhouse",
               str(CACHE / "wheelhouse")], podman)
    assert res.stdout.strip().startswith("cae2:gpu\t"), res.stdout
    assert run(["podman", "run", "--rm", "cae2:gpu", "--version"], podman).stdout.startswith("cae2 ")
    versions = run(["podman", "run", "--rm", "--entrypoint", "python", "cae2:gpu", "-c",
                    "import torch, open_clip; print(torch.__version__, open_clip.__version__)"], podman).stdout
    pins = dict(line.split("==") for line in (ROOT / "scripts" / "torch.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert versions.split()[0].split("+")[0] == pins["torch"], versions
