"""EIO at seeded random moments of every command, injected with libfiu into the unmodified process: one
line naming the file, nothing complete lost, and a rerun that equals an undisturbed run.

Reads or writes of files fail with EIO, at random (probability 0.5), for 0.3 s from a moment drawn
from the seed (after some units or checkpoints are complete). stdin, stdout and stderr never fail, so
the error line can be read. Needs libfiu (Debian's fiu-utils, installed by scripts/setup.sh) and gcc.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cae2.errors import UserError
from pipelines.shards import make_shards
from targets.store import TargetStore
from tests.fixtures import ROOT, TINY_TEACHER, cli, colour_classes, write_good_images

LIBFIU = sorted(glob.glob("/usr/lib/libfiu.so*") + glob.glob("/usr/lib/*-linux-gnu/libfiu.so*"))
RUN_PRELOAD = next(iter(glob.glob("/usr/lib/fiu/fiu_run_preload.so") + glob.glob("/usr/lib/*/fiu/fiu_run_preload.so")),
                   None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (LIBFIU and RUN_PRELOAD and shutil.which("fiu-ctrl") and shutil.which("gcc")),
                       reason="libfiu (Debian fiu-utils) or gcc is not installed: scripts/setup.sh installs them "
                              "where it runs as root"),
]
POINTS = ("cae2/eio/read", "cae2/eio/write")


@pytest.fixture(scope="module")
def preload(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eio") / "eio_preload.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(ROOT / "tests/native/eio_preload.c"),
                    LIBFIU[0], "-ldl"], check=True)
    return out


class Injected:
    """A command run with the failure points in reach of fiu-ctrl."""

    def __init__(self, preload: Path, args: list[str], ctl: Path):
        self.ctl = ctl
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FIU_CTRL_FIFO": str(ctl),
               "FIU_ENABLE": "", "LD_PRELOAD": f"{RUN_PRELOAD} {preload}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def fail(self, point: str, seconds: float = 0.3) -> bool:
        """Make `point` fail half of the time for `seconds`; False when the process has already ended."""
        for command in (f"enable_random name={point},probability=0.5", f"disable name={point}"):
            if self.proc.poll() is not None:
                return False
            subprocess.run(["fiu-ctrl", "-f", str(self.ctl), "-c", command, str(self.proc.pid)], timeout=30,
                           check=True, capture_output=True)
            time.sleep(seconds)
        return True

    def wait(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=600)
        return self.proc.returncode, out, err


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.01)


def _check_failure(status: int, err: str) -> None:
    """The run either got through (status 0) or stopped with one error line naming a file."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err[-3000:]
    if status != 0:
        assert status == 2 and len(lines) == 1 and "Input/output error" in lines[0] and "/" in lines[0], err[-3000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eio_data")
    write_good_images(root / "images", 160, sizes=((240, 320), (192, 192)))
    make_shards(root / "images", root / "shards", samples_per_shard=4)  # 40 units
    return root


def _extract_args(root: Path, out: Path, *extra) -> list[str]:
    return ["extract-targets", "--shards", str(root / "shards"), "--out", str(out), "--teacher", TINY_TEACHER,
            "--pretrained", "none", "--views", "2", "--workers", "0", "--batch-size", "4", "--no-progress", *extra]


def _complete(store: Path) -> dict[str, dict]:
    try:
        ts = TargetStore.open(store)
    except UserError:  # not created yet, or being created
        return {}
    return {n: m for n in ts.unit_names() if (m := ts.marker(n)) is not None}


def _unit_arrays(store: Path) -> dict:
    ts = TargetStore.open(store)
    return {n: {a: ts.group[f"units/{n}/{a}"][:] for a in ("latents", "keys", "valid", "view_int", "view_float")}
            for n in ts.unit_names()}


def _store_scenario(preload, tmp_path, args_for, reference: Path, seed: int, point: str) -> None:
    """Inject into a command that fills a store, rerun it, and compare with the undisturbed store."""
    rng = random.Random(seed)
    out = tmp_path / "store.zarr"
    run = Injected(preload, args_for(out), tmp_path / "ctl")
    _wait_for(lambda: len(_complete(out)) >= rng.randint(2, 8) or run.proc.poll() is not None)
    time.sleep(rng.uniform(0, 0.2))
    before = _complete(out)
    assert run.fail(point), "the command ended before the moment drawn for the failure"
    status, _, err = run.wait()
    _check_failure(status, err)
    kept = _complete(out)
    assert all(kept.get(n) == m for n, m in before.items()), "a unit complete before the failure was touched"
    again = cli(*args_for(out))
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = _unit_arrays(reference), _unit_arrays(out)
    assert a.keys() == b.keys()
    for name in a:
        assert all(np.array_equal(a[name][k], b[name][k]) for k in a[name]), name


@pytest.fixture(scope="module")
def undisturbed(shards):
    """The undisturbed results every scenario is compared with: the extraction (also the conversion's source)
    and its int8 conversion."""
    assert cli(*_extract_args(shards, shards / "reference.zarr")).returncode == 0
    assert cli("convert-targets", shards / "reference.zarr", shards / "int8.zarr").returncode == 0
    return shards


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("seed", [0])
def test_eio_during_extraction(preload, undisturbed, tmp_path, point, seed):
    _store_scenario(preload, tmp_path, lambda out: _extract_args(undisturbed, out), undisturbed / "reference.zarr",
                    seed, point)


@pytest.mark.parametrize("point", POINTS)
def test_eio_during_conversion(preload, undisturbed, tmp_path, point):
    source = undisturbed / "reference.zarr"
    _store_scenario(preload, tmp_path, lambda out: ["convert-targets", str(source), str(out)],
                    undisturbed / "int8.zarr", 1, point)


def _weights_sha(run_dir: Path) -> str:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()


def _losses(run_dir: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def _run_scenario(preload, tmp_path, args_for, seed: int, point: str, result, reference: Path) -> None:
    """Inject into a resumable run after some checkpoints, resume it, and compare with an undisturbed run."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    run = Injected(preload, args_for(out), tmp_path / "ctl")
    wanted = rng.randint(1, 3)
    _wait_for(lambda: len(glob.glob(str(out / "checkpoints/*/COMPLETE"))) >= wanted or run.proc.poll() is not None)
    time.sleep(rng.uniform(0, 0.2))
    before = sorted(glob.glob(str(out / "checkpoints/*/COMPLETE")))
    assert run.fail(point), "the run ended before the moment drawn for the failure"
    status, _, err = run.wait()
    _check_failure(status, err)
    assert all(Path(c).is_file() for c in before), "a complete checkpoint was lost"
    again = cli(*args_for(out), "--resume", "latest")
    assert again.returncode == 0, again.stderr[-2000:]
    assert result(out) == result(reference)


def _pretrain_args(shards: Path, out: Path) -> list[str]:
    return ["pretrain", "--shards", str(shards / "shards"), "--targets", str(shards / "reference.zarr"), "--model",
            "cae2_debug", "--out", str(out), "--steps", "60", "--batch-size", "4", "--workers", "0",
            "--allow-random-teacher", "--lr", "1e-3", "--save-every", "4", "--keep-last", "100", "--log-every", "1",
            "--no-progress"]


@pytest.fixture(scope="module")
def pretrain_reference(undisturbed) -> Path:
    assert cli(*_pretrain_args(undisturbed, undisturbed / "run")).returncode == 0
    return undisturbed / "run"


@pytest.mark.parametrize("point", POINTS)
def test_eio_during_pretraining(preload, undisturbed, pretrain_reference, tmp_path, point):
    _run_scenario(preload, tmp_path, lambda out: _pretrain_args(undisturbed, out), 2, point,
                  lambda run: (_losses(run), _weights_sha(run)), pretrain_reference)


def _probe_args(labelled: Path, out: Path) -> list[str]:
    return ["evaluate", "linear", "--protocol", "official", "--model", f"clip:{TINY_TEACHER}:none", "--train",
            str(labelled / "train"), "--val", str(labelled / "val"), "--out", str(out) + ".json", "--run-dir", str(out),
            "--workers", "0", "--epochs", "40", "--warmup-epochs", "2", "--batch-size", "4", "--global-batch", "8",
            "--save-every", "3", "--keep-last", "100", "--no-progress"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Colour classes, and the undisturbed probe on them (labelled/probe.json)."""
    root = tmp_path_factory.mktemp("eio_labelled")
    colour_classes(root / "train", 6, seed=1)
    colour_classes(root / "val", 4, seed=2)
    assert cli(*_probe_args(root, root / "probe")).returncode == 0
    return root


@pytest.mark.parametrize("point", POINTS)
def test_eio_during_the_official_linear_probe(preload, labelled, tmp_path, point):
    def result(out: Path):
        record = json.loads(Path(str(out) + ".json").read_text())["results"]
        return record["head_sha256"], record["top1"]

    _run_scenario(preload, tmp_path, lambda out: _probe_args(labelled, out), 3, point, result, labelled / "probe")
