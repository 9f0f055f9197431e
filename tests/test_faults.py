"""Faults made for real (a full file system, kills at seeded random moments) and what users get: one
line naming the file and what to do, nothing complete lost, and a rerun that ends where an undisturbed
run ends. CAE2_SOAK=N runs N kills per stage instead of 2 (a longer manual soak)."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.shards import make_shards
from tests.fixtures import (
    ACCELERATE_2CPU,
    ENV,
    ROOT,
    TINY_TEACHER,
    cli,
    hold_when,
    kill_rank_when,
    signal_job,
    write_good_images,
)

KILLS = int(os.environ.get("CAE2_SOAK", "2"))


def extract(shards, out):
    return ["extract-targets", "--shards", str(shards), "--out", str(out), "--teacher", TINY_TEACHER, "--pretrained",
            "none", "--views", "2", "--workers", "0"]


def store_values(path: Path) -> dict:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    return {name: [g[f"units/{name}/{a}"][:] for a in ("latents", "keys", "valid", "view_int", "view_float")]
            for name in g["units"].group_keys()}


def same_store(a: Path, b: Path) -> None:
    va, vb = store_values(a), store_values(b)
    assert va.keys() == vb.keys()
    for name in va:
        for x, y in zip(va[name], vb[name], strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y)), name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_good_images(root / "images", 48, sizes=((120, 160), (96, 96)))
    make_shards(root / "images", root / "shards", samples_per_shard=3)  # 16 units
    assert cli(*extract(root / "shards", root / "ref.zarr")).returncode == 0
    return root


@pytest.fixture
def small_fs(tmp_path):
    """A real file system that fills up: a 256 KiB tmpfs (needs root; skipped elsewhere)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (root only)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_during_stage_1_gives_one_line_and_the_rerun_finishes(shards, small_fs):
    out = small_fs / "t.zarr"
    res = cli(*extract(shards / "shards", out))
    assert res.returncode == 2 and "No space left on device" in res.stderr and "Traceback" not in res.stderr
    assert "rerun the same command" in res.stderr and str(out) in res.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    res = cli(*extract(shards / "shards", out))
    assert res.returncode == 0, res.stderr[-2000:]
    same_store(shards / "ref.zarr", out)


@pytest.mark.slow
def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_previous_one(shards, small_fs, tmp_path):
    run = small_fs / "run"
    args = ["pretrain", "--shards", str(shards / "shards"), "--targets", str(shards / "ref.zarr"), "--model",
            "cae2_debug", "--out", str(run), "--batch-size", "4", "--workers", "0", "--allow-random-teacher",
            "--save-every", "2", "--log-every", "1", "--lr", "1e-3"]
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    res = cli(*args, "--steps", "2")
    assert res.returncode == 0, res.stderr[-2000:]  # one checkpoint fits
    subprocess.run(["mount", "-o", "remount,size=" + str(sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
                                                              // 1024 + 200) + "k", str(small_fs)], check=True)
    res = cli(*args, "--steps", "6", "--resume", "latest")
    assert res.returncode == 2 and "writing checkpoint" in res.stderr and "step_00000002 is kept" in res.stderr
    assert "No space left on device" in res.stderr
    assert "Traceback" not in res.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    res = cli(*args, "--steps", "6", "--resume", "latest")
    assert res.returncode == 0, res.stderr[-2000:]
    ref = tmp_path / "ref"  # the same two runs, undisturbed
    ref_args = [a if a != str(run) else str(ref) for a in args]
    assert cli(*ref_args, "--steps", "2").returncode == 0
    assert cli(*ref_args, "--steps", "6", "--resume", "latest").returncode == 0
    metrics = [(run / "metrics.jsonl").read_text(), (ref / "metrics.jsonl").read_text()]
    strip = [[{k: v for k, v in json.loads(line).items() if k not in ("samples_per_s", "data_wait_frac")}
              for line in m.splitlines()] for m in metrics]
    assert strip[0] == strip[1] and len(strip[0]) == 6


def _kill_at_random_moments(command: list[str], progress, total: int, seed: int, signum=signal.SIGKILL) -> int:
    """KILLS runs of `command`, each signalled at a seeded random point of the work: between the moments
    `progress()` (units or steps done, of `total`) reaches a random count in the first half of what is left
    and that count + 1, after a random number of the job's 20 ms slices. The job runs in slices while
    progress is read, so the point does not depend on the machine's speed. Returns the signals that landed
    on a running job."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(KILLS):
        done = progress()
        target = rng.randint(done + 1, done + max(1, (total - done) // 2))
        left = [rng.randint(1, 41)]  # slices to run once `target` is reached

        def reached(target=target, left=left) -> bool:
            now = progress()
            left[0] -= now >= target
            return now > target or (now == target and left[0] <= 0)

        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT,
                                start_new_session=True)
        landed += hold_when(proc, reached)
        signal_job(proc, signum)
        proc.wait()
    return landed


def _complete_units(store: Path) -> int:
    return sum('"complete"' in p.read_text() for p in store.glob("units/*/zarr.json"))


def _steps_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return metrics.read_text().count('"loss"') if metrics.exists() else 0


@pytest.mark.slow
def test_kill_9_at_random_moments_of_stage_1(shards, tmp_path):
    out = tmp_path / "k.zarr"
    command = [sys.executable, "-m", "pipelines.cli", *extract(shards / "shards", out)]
    assert _kill_at_random_moments(command, lambda: _complete_units(out), 16, seed=1) == KILLS
    assert 0 < _complete_units(out) < 16
    res = cli(*extract(shards / "shards", out))
    assert res.returncode == 0, res.stderr[-2000:]
    same_store(shards / "ref.zarr", out)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_kill_or_term_at_random_moments_of_stage_2(shards, tmp_path, signum):
    def args(out, resume):
        return ["pretrain", "--shards", str(shards / "shards"), "--targets", str(shards / "ref.zarr"), "--model",
                "cae2_debug", "--out", str(out), "--batch-size", "4", "--workers", "1", "--allow-random-teacher",
                "--save-every", "2", "--log-every", "1", "--steps", "40", "--lr", "1e-3",
                *(["--resume", "latest"] if resume else [])]

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli(*args(ref, False)).returncode == 0
    command = [sys.executable, "-m", "pipelines.cli", *args(run, True)]
    assert _kill_at_random_moments(command, lambda: _steps_logged(run), 40, seed=int(signum), signum=signum) == KILLS
    res = cli(*args(run, True))
    assert res.returncode == 0, res.stderr[-2000:]

    def records(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ("samples_per_s", "data_wait_frac")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert records(run) == records(ref)


def _pretrain(shards_spec, store, out, *extra):
    return ["pretrain", "--shards", str(shards_spec), "--targets", str(store), "--model", "cae2_debug", "--out",
            str(out), "--batch-size", "4", "--workers", "0", "--allow-random-teacher", "--steps", "12", "--lr", "1e-3",
            *extra]


def test_shards_changed_missing_or_truncated_after_stage_1_are_named(shards, tmp_path):
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(shards / "shards", changed)
    files = sorted(changed.glob("*.tar"))
    files[0].write_bytes(files[1].read_bytes())  # another shard's samples under the first one's name
    res = cli(*_pretrain(changed, shards / "ref.zarr", tmp_path / "a"))
    # another size: refused before training (the same size would be caught by the keys as they stream)
    assert res.returncode == 2 and files[0].name in res.stderr and "is not the shard" in res.stderr, res.stderr[-800:]
    truncated = tmp_path / "truncated"
    shutil.copytree(shards / "shards", truncated)
    tar = sorted(truncated.glob("*.tar"))[2]
    tar.write_bytes(tar.read_bytes()[:3000])
    res = cli(*_pretrain(truncated, shards / "ref.zarr", tmp_path / "b"))
    assert res.returncode == 2 and tar.name in res.stderr and "Traceback" not in res.stderr, res.stderr[-800:]
    missing = tmp_path / "missing"
    shutil.copytree(shards / "shards", missing)
    gone = sorted(missing.glob("*.tar"))[3]
    res = cli(*_pretrain(f"{missing}/shard-{{000000..000015}}.tar", shards / "ref.zarr", tmp_path / "c"))
    assert res.returncode == 0, res.stderr[-800:]
    gone.unlink()
    res = cli(*_pretrain(f"{missing}/shard-{{000000..000015}}.tar", shards / "ref.zarr", tmp_path / "d"))
    assert res.returncode == 2 and gone.name in res.stderr and "does not exist" in res.stderr


@pytest.mark.slow
def test_a_read_only_or_vanished_store_or_run_dir_gives_one_line(shards, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (root only)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)  # root ignores chmod; a mount does not
        res = cli(*extract(shards / "shards", ro / "t.zarr"))  # refused before any work
        assert res.returncode == 2 and "is not writable" in res.stderr and "Traceback" not in res.stderr
        res = cli(*_pretrain(shards / "shards", shards / "ref.zarr", ro / "run"))
        assert res.returncode == 2 and "is not writable" in res.stderr and "Traceback" not in res.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    res = cli(*_pretrain(shards / "shards", tmp_path / "vanished.zarr", tmp_path / "e"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "vanished.zarr" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract-targets", "pretrain"])
def test_a_rank_killed_in_a_launch_leaves_one_line_from_the_survivor_and_a_true_launcher_line(command, shards,
                                                                                           tmp_path):
    if command == "extract-targets":
        out = tmp_path / "t.zarr"
        args = extract(shards / "shards", out)

        def reached() -> bool:
            return _complete_units(out) >= 2
    else:
        out = tmp_path / "run"
        args = ["pretrain", "--shards", str(shards / "shards"), "--targets", str(shards / "ref.zarr"), "--model",
                "cae2_debug", "--out", str(out), "--steps", "500", "--batch-size", "2", "--workers", "0",
                "--log-every", "1", "--save-every", "2", "--lr", "1e-3", "--allow-random-teacher", "--no-progress"]

        def reached() -> bool:
            return _steps_logged(out) >= 3
    launcher = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "launch", *ACCELERATE_2CPU[3:], *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                                start_new_session=True)
    kill_rank_when(launcher, 1, reached)
    _, err = launcher.communicate(timeout=180)
    lines = err.strip().splitlines()
    assert launcher.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error: launch failed: rank 0 ") and "rank 1 was killed by SIGKILL from outside and " \
        "could say nothing" in lines[-1], lines[-1]
    said = [x for x in lines[:-1] if x.startswith(("rank 0:", "error: rank 0:"))]
    assert len(said) == 1 and ("stopped by SIGTERM" in said[0] or "another process of this launch ended" in said[0]), \
        err[-4000:]
    assert "complete work is kept" in said[0], said
    if command == "pretrain":  # a complete checkpoint is kept for the relaunch
        assert any((c / "COMPLETE").is_file() for c in (out / "checkpoints").iterdir())
    else:  # the rerun keeps the units both ranks completed and does the rest
        res = cli(*args)
        assert res.returncode == 0 and "written, 0 already complete" not in res.stdout, res.stderr[-2000:]
        assert _complete_units(out) == 16


@pytest.mark.slow
def test_ctrl_c_while_starting_and_during_convert_is_one_line_and_status_130(shards, tmp_path):
    import time

    cae2_script = str(Path(sys.executable).parent / "cae2")
    for delay in (0.2, 0.8, 1.6):  # torch and the rest are being imported: a Ctrl-C anywhere in it
        starting = subprocess.Popen([cae2_script, "verify-targets", str(shards / "ref.zarr")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        time.sleep(delay)
        starting.send_signal(signal.SIGINT)
        _, err = starting.communicate(timeout=60)
        assert starting.returncode == 130 and len(err.strip().splitlines()) == 1, (delay, err[-3000:])
        assert err.startswith("interrupted"), err
    out = tmp_path / "int8.zarr"
    convert = subprocess.Popen([cae2_script, "convert-targets", str(shards / "ref.zarr"), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                               start_new_session=True)
    assert hold_when(convert, lambda: len(list(out.glob("units/*/keys"))) >= 3)
    signal_job(convert, signal.SIGINT)
    _, err = convert.communicate(timeout=60)
    assert convert.returncode == 130 and "Traceback" not in err and "Task was destroyed" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: complete work is kept"), err[-2000:]
