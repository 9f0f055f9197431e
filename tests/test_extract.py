"""Stage 1 end to end on real tar shards, a real Zarr store and a tiny random open_clip teacher."""

import io
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from cae2.errors import UserError
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.extract.verify import verify_store
from pipelines.shards import expand_shards, image_bytes, iter_shard, make_shards
from targets.store import TargetStore
from targets.teacher import Teacher, TeacherSpec
from targets.unit_files import unit_files
from targets.views import ViewParams, apply_view, measure_view
from tests.fixtures import (
    ACCELERATE_2CPU,
    ENV,
    TINY_TEACHER,
    cli,
    hold_when,
    launch_errors,
    signal_job,
    write_bad_images,
    write_good_images,
)

SPEC = TeacherSpec(name=TINY_TEACHER, pretrained="none")


def extract_args(shards, out, views=2):
    return ["extract-targets", "--shards", str(shards), "--out", str(out), "--teacher", TINY_TEACHER,
            "--pretrained", "none", "--views", str(views), "--workers", "0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_good_images(root / "images", 10)
    bad = write_bad_images(root / "images")
    make_shards(root / "images", root / "shards", samples_per_shard=6)
    return root / "shards", bad


@pytest.fixture(scope="module")
def store(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "targets.zarr"
    stats = run_extract(ExtractConfig(shards=str(shards[0]), out=str(out), teacher=SPEC, views_per_image=3,
                                      workers=2, batch_size=5, progress=False))
    return out, stats


def test_shards_are_webdataset_with_dotless_keys(shards):
    samples = [s for sh in expand_shards(str(shards[0])) for s in iter_shard(sh.url)]
    assert len(samples) == 18
    assert all("." not in s["__key__"] and {"jpg", "cls", "json"} <= set(s) for s in samples)
    assert [s["__key__"] for s in samples] == sorted(s["__key__"] for s in samples)


def test_store_layout_opens_with_plain_zarr(store):
    out, stats = store
    g = zarr.open_group(str(out), mode="r")
    meta = g.attrs["cae2"]
    assert meta["views_per_image"] == 3 and meta["num_tokens"] == 17 and meta["latent_dim"] == 32
    assert meta["teacher"]["random_init"] is True and meta["grid"] == [4, 4]
    units = sorted(g["units"].group_keys())
    assert units == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    u = g["units/shard-000000.tar"]
    assert u["latents"].shape == (6, 3, 17, 32) and u["latents"].dtype == np.float16
    assert u["view_int"].shape == (6, 3, 10) and u["view_int"].dtype == np.int32
    assert u["view_float"].shape == (6, 3, 4) and u["view_float"].dtype == np.float32
    assert u["keys"].shape == (6,) and u["valid"].dtype == bool and u["image_hw"].shape == (6, 2)
    assert u.attrs["complete"]["num_samples"] == 6
    assert stats.images == 16 and stats.views == 48 and sum(stats.skipped.values()) == 2


def test_bad_images_are_skipped_and_recorded(store, shards):
    out, _ = store
    ts = TargetStore.open(out)
    skipped, valid_hw = [], []
    for name in ts.unit_names():
        unit = ts.unit(name)
        skipped += [s["key"] for s in unit.marker["skipped"]]
        valid_hw += [tuple(hw) for hw, v in zip(unit.image_hw, unit.valid, strict=True) if v]
        assert all(s["reason"] for s in unit.marker["skipped"])
    assert sorted(k.split("_", 1)[1] for k in skipped) == ["truncated", "zero_bytes"]
    assert (1, 1) in valid_hw and (2000, 3000) in valid_hw


def test_fidelity_cached_view_equals_teacher_on_reapplied_view(store, shards):
    out, _ = store
    ts = TargetStore.open(out)
    teacher = Teacher(SPEC)  # built independently of the extraction run
    flips, jittered, checked = 0, 0, 0
    for shard in expand_shards(str(shards[0])):
        unit = ts.unit(shard.name)
        for row, sample in enumerate(iter_shard(shard.url)):
            assert unit.keys[row] == sample["__key__"]
            if not unit.valid[row]:
                continue
            img = Image.open(io.BytesIO(image_bytes(sample))).convert("RGB")  # decoded independently
            for k in range(3):
                p = ViewParams.from_record(unit.view_int[row, k], unit.view_float[row, k])
                # the stored contrast mean is the one of the whole (independently decoded) image
                assert p.contrast_mean == measure_view(replace(p, contrast_mean=None), img).contrast_mean
                flips += p.flip
                jittered += p.brightness != 1.0
                view = apply_view(img, p, teacher.image_size, "bicubic")
                fresh = teacher(view[None])[0]
                cached = torch.from_numpy(unit.read(row, k).astype(np.float32))
                cos = F.cosine_similarity(fresh, cached, dim=-1)
                assert cos[0] >= 0.9999 and cos[1:].min() >= 0.9999, (shard.name, row, k, cos.min())
                checked += 1
    assert checked == 48 and flips > 5 and jittered == 48


def _reseal(store: Path, unit: str) -> None:
    """Make a unit's marker promise its files as they are now (a store whose values went wrong while its
    marker holds, as a faulty writer could leave it)."""
    g = zarr.open_group(str(store), mode="r+")
    marker = dict(g[f"units/{unit}"].attrs["complete"])
    g[f"units/{unit}"].attrs["complete"] = marker | {"files": unit_files(store / "units" / unit)}


def test_verify_passes_and_detects_damage(store, shards, tmp_path):
    out, _ = store
    report = verify_store(str(out), str(shards[0]), recompute=4)
    assert report.ok, report.summary()
    assert report.recomputed == 4 and report.min_cosine > 0.9999
    import shutil

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(out, damaged)
    g = zarr.open_group(str(damaged), mode="r+")
    g["units/shard-000001.tar/view_int"][0, 0, 5] = 999  # crop box off the image
    lat = g["units/shard-000002.tar/latents"]
    block = lat[0:6]
    block[1, 0, 0, 0] = np.nan
    lat[0:6] = block
    del g["units/shard-000000.tar"].attrs["complete"]
    problems = "\n".join(verify_store(str(damaged), str(shards[0])).problems)
    assert "shard-000000.tar is missing or incomplete" in problems
    # rewriting the compressed view_int changed its file's size: the marker no longer holds
    assert "shard-000001.tar is damaged" in problems and "view_int" in problems
    for unit in ("shard-000001.tar", "shard-000002.tar"):  # markers that hold over wrong values
        _reseal(damaged, unit)
    problems = "\n".join(verify_store(str(damaged), str(shards[0])).problems)
    assert "outside" in problems and "NaN" in problems and "checksum" in problems

    wrong_mean = tmp_path / "wrong-mean.zarr"
    shutil.copytree(out, wrong_mean)
    g = zarr.open_group(str(wrong_mean), mode="r+")
    for unit in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        ints = g[f"units/{unit}/view_int"][:]
        ints[..., 9] = (ints[..., 9] + 9) % 256
        g[f"units/{unit}/view_int"][:] = ints
        _reseal(wrong_mean, unit)
    report = verify_store(str(wrong_mean), str(shards[0]), recompute=3)
    assert not report.ok and "stored contrast mean" in "\n".join(report.problems), report.summary()


def test_rerun_skips_complete_units_and_clash_is_refused(store, shards):
    out, _ = store
    stats = run_extract(ExtractConfig(shards=str(shards[0]), out=str(out), teacher=SPEC, views_per_image=3,
                                      workers=0, progress=False))
    assert stats.units_done == 0 and stats.units_already_complete == 3
    res = cli(*extract_args(shards[0], out))  # K=2 against a K=3 store
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "views_per_image: store has 3, this run 2" in err[0]


def test_settings_check_is_read_only_and_creation_clears_a_half_created_store(store, tmp_path):
    meta = TargetStore.open(store[0]).meta
    half = tmp_path / "half.zarr"
    zarr.open_group(str(half), mode="w")  # a creation killed before the cae2 attribute was written
    TargetStore.check_settings(half, meta)  # what every rank runs side by side: must not touch it
    assert (half / "zarr.json").is_file()
    assert TargetStore.create_or_validate(half, meta).meta.differences(meta) == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a cae2 target store"):
        TargetStore.check_settings(other, meta)
    with pytest.raises(UserError, match="views_per_image: store has 3, this run 2"):
        TargetStore.check_settings(store[0], replace(meta, views_per_image=2))


@pytest.mark.parametrize("case", ["missing_shard", "unknown_teacher", "missing_weights", "bad_tag", "remote_out"])
def test_bad_inputs_give_one_clear_line(case, shards, tmp_path):
    args = {
        "missing_shard": extract_args(tmp_path / "nope-{000..003}.tar", tmp_path / "a.zarr"),
        "unknown_teacher": ["extract-targets", "--shards", str(shards[0]), "--out", str(tmp_path / "b.zarr"),
                            "--teacher", "ViT-Q-99", "--pretrained", "none"],
        "missing_weights": ["extract-targets", "--shards", str(shards[0]), "--out", str(tmp_path / "c.zarr")],
        "bad_tag": ["extract-targets", "--shards", str(shards[0]), "--out", str(tmp_path / "d.zarr"),
                    "--pretrained", "no-such-tag"],
        "remote_out": [*extract_args(shards[0], "s3://bucket/targets.zarr"), "--storage-option",
                       "endpoint=http://127.0.0.1:9", "--retry-seconds", "2"],
    }[case]
    t0 = time.time()
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        res = cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, res.stderr
    expected = {"missing_shard": "nope-000.tar does not exist", "unknown_teacher": "unknown open_clip model",
                "missing_weights": "--pretrained /path/to/weights", "bad_tag": "no pretrained tag",
                "remote_out": "no credentials: set AWS_ACCESS_KEY_ID"}[case]
    assert expected in err[0]
    assert time.time() - t0 < 60
    assert not (tmp_path / "a.zarr").exists()


def _unit_values(path):
    ts = TargetStore.open(path)
    out = {}
    for name in ts.unit_names():
        u = ts.unit(name)
        out[name] = (u.latents[:], u.keys, u.valid, u.view_int, u.view_float, u.marker["checksum"])
    return out


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    write_good_images(tmp_path / "images", 48, sizes=((300, 400), (256, 256)))
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=3)
    ref = tmp_path / "ref.zarr"
    assert cli(*extract_args(tmp_path / "shards", ref)).returncode == 0
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *extract_args(tmp_path / "shards", out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    assert hold_when(proc, lambda: len(list(out.glob("units/*/keys"))) >= 2)
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("units/*/keys")))
    assert 0 < done < 16, f"the kill landed with {done} of 16 units complete"
    res = cli(*extract_args(tmp_path / "shards", out))
    assert res.returncode == 0, res.stderr
    assert not list(out.rglob("*.partial"))
    a, b = _unit_values(ref), _unit_values(out)
    assert a.keys() == b.keys() and len(a) == 16
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y)) if not isinstance(x, str) else x == y, name
    assert verify_store(str(out), str(tmp_path / "shards")).ok


def test_a_claim_left_half_written_is_redone_not_counted_complete(store, shards, tmp_path, monkeypatch):
    """A job whose write of a unit's claim failed (EIO) leaves an empty claim file and no unit: a rerun
    waits for the claim to count as abandoned, then writes the unit."""
    import shutil

    monkeypatch.setattr("targets.claims.HALF_WRITTEN_FOR", 0.5)  # 5 s in real runs
    out = tmp_path / "copy.zarr"
    shutil.copytree(store[0], out)
    name = TargetStore.open(out).unit_names()[1]
    shutil.rmtree(out / "units" / name)
    claim = TargetStore.open(out).claim_path(name)
    claim.parent.mkdir(exist_ok=True)
    claim.touch()
    stats = run_extract(ExtractConfig(shards=str(shards[0]), out=str(out), teacher=SPEC, views_per_image=3,
                                      workers=2, batch_size=5, progress=False))
    assert stats.units_done == 1 and not stats.units_elsewhere
    a, b = _unit_values(store[0]), _unit_values(out)
    assert a.keys() == b.keys()
    for x, y in zip(a[name], b[name], strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)) if not isinstance(x, str) else x == y


@pytest.mark.slow
def test_accelerate_two_processes_equal_one(shards, store, tmp_path):
    out = tmp_path / "two.zarr"
    res = subprocess.run([*ACCELERATE_2CPU, "-m", "pipelines.cli",
                          *extract_args(shards[0], out, views=3)],
                         capture_output=True, text=True, timeout=600, env=ENV, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, launch_errors(res.stderr)
    assert "images: 16  views: 48  skipped: 2" in res.stdout and "over 2 rank(s)" in res.stdout
    one, two = _unit_values(store[0]), _unit_values(out)
    assert one.keys() == two.keys()
    keys = [k for name in two for k in two[name][1]]
    assert len(keys) == len(set(keys)) == 18  # every image exactly once
    for name in one:
        np.testing.assert_allclose(one[name][0].astype(np.float32), two[name][0].astype(np.float32), atol=2e-3)
        for i in range(1, 5):
            assert np.array_equal(one[name][i], two[name][i])


def test_fast_local_reads_equal_zarr_reads(store):
    out, _ = store
    ts = TargetStore.open(out)
    for name in ts.unit_names():
        unit = ts.unit(name)
        assert unit._fast is not None  # the layout cae2 writes is recognised
        for row in range(len(unit)):
            for k in range(3):
                assert np.array_equal(unit.read(row, k), unit.latents[row, k])


def _writers(store: Path) -> dict[str, int]:
    ts = TargetStore.open(store)
    return {name: ts.marker(name)["writer"]["pid"] for name in ts.unit_names()}


def _start_together(args: list[str], tmp_path: Path, count: int):
    """Start `count` jobs and hold each (SIGSTOP) once it has opened the store and said how many units it has
    to do, before it claims any; go on with all of them at once. Without the barrier a job that starts
    first on a busy machine can finish every unit before the others have imported torch."""
    procs, logs = [], []
    for i in range(count):
        out_log, err_log = tmp_path / f"job{i}.out", tmp_path / f"job{i}.err"
        with out_log.open("w") as out, err_log.open("w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], stdout=out, stderr=err,
                                          env={**ENV, "PYTHONUNBUFFERED": "1"}))
        logs.append((out_log, err_log))
    waiting = set(range(count))
    deadline = time.time() + 300
    while waiting and time.time() < deadline:
        for i in list(waiting):
            if "to do on this rank" in logs[i][1].read_text() or procs[i].poll() is not None:
                procs[i].send_signal(signal.SIGSTOP)
                waiting.discard(i)
        time.sleep(0.005)
    for p in procs:
        p.send_signal(signal.SIGCONT)
    return procs, logs


@pytest.mark.slow
def test_three_concurrent_jobs_share_the_units_and_equal_one_job(tmp_path):
    write_good_images(tmp_path / "images", 36, sizes=((120, 160), (96, 96)))
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=2)  # 18 units
    # A job claims the units whose views it has queued for the teacher: small batches keep that to about
    # one unit ahead (as on real shards of ~1000 images), so that the jobs share the units.
    args = [*extract_args(tmp_path / "shards", tmp_path / "ref.zarr"), "--batch-size", "4"]
    ref = tmp_path / "ref.zarr"
    assert cli(*args).returncode == 0
    out = tmp_path / "shared.zarr"
    args[args.index("--out") + 1] = str(out)
    procs, logs = _start_together(args, tmp_path, 3)
    for p in procs:
        p.wait(timeout=600)
    outputs = [(out_log.read_text(), err_log.read_text()) for out_log, err_log in logs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outputs]
    written = [int(o[0].split("units: ")[1].split(" written")[0]) for o in outputs]
    pids = {p.pid for p in procs}
    writers = _writers(out)
    assert sum(written) == 18 and len(writers) == 18  # every unit written exactly once, by one of the three
    assert set(writers.values()) <= pids and len(set(writers.values())) >= 2  # the work was shared
    for pid, count in zip((p.pid for p in procs), written, strict=True):
        assert list(writers.values()).count(pid) == count
    a, b = _unit_values(ref), _unit_values(out)
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert np.array_equal(np.asarray(x), np.asarray(y)) if not isinstance(x, str) else x == y, name
    assert verify_store(str(out), str(tmp_path / "shards")).ok and not list((out / ".claims").glob("*.claim"))


@pytest.mark.slow
def test_a_plain_job_and_a_two_rank_launch_share_one_store(tmp_path):
    write_good_images(tmp_path / "images", 24, sizes=((120, 160),))
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=2)  # 12 units
    ref = tmp_path / "ref.zarr"
    assert cli(*extract_args(tmp_path / "shards", ref)).returncode == 0
    out = tmp_path / "mixed.zarr"
    launch = subprocess.Popen([*ACCELERATE_2CPU, "-m", "pipelines.cli", *extract_args(tmp_path / "shards", out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                              cwd=Path(__file__).parent.parent)
    plain = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *extract_args(tmp_path / "shards", out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    (lo, le), (po, pe) = launch.communicate(timeout=600), plain.communicate(timeout=600)
    assert launch.returncode == 0, launch_errors(le)
    assert plain.returncode == 0, pe[-2000:]
    written = [int(o.split("units: ")[1].split(" written")[0]) for o in (lo, po)]
    assert sum(written) == 12 and len(_writers(out)) == 12
    a, b = _unit_values(ref), _unit_values(out)
    for name in a:
        np.testing.assert_allclose(a[name][0].astype(np.float32), b[name][0].astype(np.float32), atol=2e-3)
        for i in range(1, 5):
            assert np.array_equal(a[name][i], b[name][i])
