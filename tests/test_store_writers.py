"""Every writer of a store claims its units, every completion marker proves its files, and a store is
reused only for the shards (or the source store) it was made from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import run
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.shards import make_shards
from targets.store import TargetStore
from targets.teacher import TeacherSpec
from tests.fixtures import ACCELERATE_2CPU, ENV, ROOT, TINY_TEACHER, launch_errors, write_good_images

ARRAYS = ("latents", "scales", "keys", "valid", "view_int", "view_float", "image_hw", "view_crc32c")


def _extract(shards: Path, out: Path, fmt: str = "fp16", **kw) -> None:
    teacher = TeacherSpec(name=TINY_TEACHER, pretrained="none")
    run_extract(ExtractConfig(shards=str(shards), out=str(out), teacher=teacher, views_per_image=2, workers=0,
                              progress=False, latent_format=fmt, **kw))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An fp16 store of 12 units (2 images each) and its shards."""
    root = tmp_path_factory.mktemp("writers")
    write_good_images(root / "images", 24, sizes=((72, 96), (64, 64)))
    make_shards(root / "images", root / "shards", samples_per_shard=2)
    _extract(root / "shards", root / "fp16.zarr")
    assert run(["convert-targets", str(root / "fp16.zarr"), str(root / "int8.zarr")]) == 0  # the reference
    return root


def _arrays(store: Path) -> dict[str, dict[str, np.ndarray]]:
    ts = TargetStore.open(store)
    out = {}
    for name in ts.unit_names():
        g = ts.group[f"units/{name}"]
        out[name] = {a: g[a][:] for a in ARRAYS if a in g}
    return out


def _convert(*args, wait=True):
    cmd = [sys.executable, "-m", "pipelines.cli", "convert-targets", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    return proc.communicate(timeout=300) + (proc.returncode,) if wait else proc


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [2, 3])
def test_concurrent_converts_equal_one(source, tmp_path, jobs):
    ref = source / "int8.zarr"
    out = tmp_path / "shared.zarr"
    procs = [_convert(source / "fp16.zarr", out, wait=False) for _ in range(jobs)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(r[2] == 0 and "Traceback" not in r[1] for r in results), [r[1][-800:] for r in results]
    written = [int(r[0].split("units: ")[1].split(" converted")[0]) for r in results]
    assert sum(written) == 12  # each unit written once, by one of the jobs
    a, b = _arrays(ref), _arrays(out)
    assert a.keys() == b.keys()
    for name in a:
        assert all(np.array_equal(a[name][k], b[name][k]) for k in a[name]), name
    assert run(["verify-targets", str(out)]) == 0


@pytest.mark.slow
def test_a_convert_beside_a_two_rank_convert_and_an_extraction(source, tmp_path):
    ref = source / "int8.zarr"
    out = tmp_path / "shared.zarr"
    two = subprocess.Popen([*ACCELERATE_2CPU, "-m", "pipelines.cli", "convert-targets", str(source / "fp16.zarr"),
                            str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    plain = _convert(source / "fp16.zarr", out, wait=False)
    extract = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "extract-targets", "--shards",
                                str(source / "shards"), "--out", str(out), "--teacher", TINY_TEACHER, "--pretrained",
                                "none", "--views", "2", "--workers", "0", "--latent-format", "int8"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    for proc in (two, plain, extract):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "Traceback" not in err, launch_errors(err)
    a, b = _arrays(ref), _arrays(out)
    for name in a:
        assert all(np.array_equal(a[name][k], b[name][k]) for k in ("latents", "scales", "keys", "valid")), name


def test_a_marker_whose_files_do_not_hold_is_named_and_redone(source, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(source / "fp16.zarr", store)
    reference = _arrays(source / "fp16.zarr")
    valid = store / "units/shard-000003.tar/valid"
    shutil.rmtree(valid)  # an array gone under a complete marker
    block = next((store / "units/shard-000007.tar/latents/c").rglob("*"))
    while block.is_dir():
        block = next(block.iterdir())
    block.write_bytes(block.read_bytes()[:100])  # a block file cut short
    assert run(["verify-targets", str(store)]) == 1
    out = capsys.readouterr().out
    assert "unit shard-000003.tar is damaged" in out and "valid" in out and "rerun" in out
    assert "unit shard-000007.tar is damaged" in out and "100 bytes" in out
    status = run(["pretrain", "--shards", str(source / "shards"), "--targets", str(store), "--model", "cae2_debug",
                  "--out", str(tmp_path / "run"), "--allow-random-teacher", "--lr", "1e-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "damaged" in err[0] and "rerun" in err[0], err
    assert not (tmp_path / "run").exists()
    _extract(source / "shards", store)  # the rerun redoes exactly the damaged units
    assert run(["verify-targets", str(store)]) == 0
    capsys.readouterr()
    redone = _arrays(store)
    for name in reference:
        assert all(np.array_equal(reference[name][k], redone[name][k]) for k in reference[name]), name


def test_damaged_metadata_is_one_line_for_every_command(source, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(source / "fp16.zarr", store)
    (store / "units/shard-000002.tar/zarr.json").write_text("garbage{")
    assert run(["verify-targets", str(store)]) == 1
    assert "shard-000002.tar is damaged" in capsys.readouterr().out
    _extract(source / "shards", store)  # a rerun redoes the unit
    assert run(["verify-targets", str(store)]) == 0
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["cae2"] = 42
    (store / "zarr.json").write_text(json.dumps(root))
    for args in (["verify-targets", str(store)], ["convert-targets", str(store), str(tmp_path / "c.zarr")],
                 ["pretrain", "--shards", str(source / "shards"), "--targets", str(store), "--out",
                  str(tmp_path / "r"), "--lr", "1e-3"],
                 ["extract-targets", "--shards", str(source / "shards"), "--out", str(store), "--teacher",
                  TINY_TEACHER, "--pretrained", "none", "--views", "2"]):
        status = run(args)
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error:")]
        assert status == 2 and len(errors) == 1 and "zarr.json is damaged" in err[-1], (args[0], err)


def test_a_store_is_reused_only_for_its_own_shards_or_source(source, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(source / "fp16.zarr", store)
    other = tmp_path / "other"
    write_good_images(tmp_path / "other_images", 24, seed=5, sizes=((72, 96), (64, 64)))
    make_shards(tmp_path / "other_images", other, samples_per_shard=2)  # the same shard names, other images
    args = ["extract-targets", "--shards", str(other), "--out", str(store), "--teacher", TINY_TEACHER,
            "--pretrained", "none", "--views", "2", "--workers", "0"]
    status = run(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "is not the shard unit shard-000000.tar" in err[-1], err
    copied = tmp_path / "copied"
    shutil.copytree(source / "shards", copied)  # the same bytes elsewhere (new mtimes): accepted
    assert run([*args[:2], str(copied), *args[3:]]) == 0
    capsys.readouterr()
    _extract(other, tmp_path / "other.zarr")  # a store of the other images with the same settings
    dst = tmp_path / "dst.zarr"
    assert run(["convert-targets", str(store), str(dst)]) == 0
    capsys.readouterr()
    status = run(["convert-targets", str(tmp_path / "other.zarr"), str(dst)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and "made from another shard" in err[-1] and "shard-000000.tar" in err[-1], err
    status = run(["convert-targets", str(store), f"{tmp_path}/./s.zarr/"])
    assert status == 2 and "overlaps SRC" in capsys.readouterr().err
