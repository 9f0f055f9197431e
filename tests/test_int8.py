"""int8 target stores: quantisation error, markers, --min-cosine, conversion, stage 2 on int8 targets."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

import cae2
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.extract.verify import verify_store
from pipelines.pretrain.data import StreamConfig, index_shards, make_loader
from pipelines.shards import expand_shards, make_shards
from targets.quantize import QMAX, dequantize, quantize, token_errors
from targets.store import TargetStore
from targets.teacher import Teacher, TeacherSpec
from tests.fixtures import ENV, ROOT, TINY_TEACHER, cli, hold_when, signal_job, write_bad_images, write_good_images

SPEC = TeacherSpec(name=TINY_TEACHER, pretrained="none")


def _extract(shards: Path, out: Path, fmt: str, **kw):
    cfg = ExtractConfig(shards=str(shards), out=str(out), teacher=SPEC, views_per_image=2, workers=0, batch_size=6,
                        progress=False, latent_format=fmt, **kw)
    return run_extract(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    write_good_images(root / "images", 22)
    write_bad_images(root / "images")  # 2 of them are skipped
    make_shards(root / "images", root / "shards", samples_per_shard=6)
    _extract(root / "shards", root / "fp16.zarr", "fp16")
    stats = _extract(root / "shards", root / "int8.zarr", "int8")
    return root, stats


def _arrays(store: Path, name: str) -> dict:
    g = zarr.open_group(str(store), mode="r")[f"units/{name}"]
    return {k: g[k][:] for k in ("latents", "scales", "valid", "view_int", "view_float", "image_hw") if k in g}


def test_round_trip_error_is_bounded_by_the_scale():
    x = torch.randn(4, 9, 197, 64) * torch.logspace(-3, 2, 197).view(1, 1, 197, 1)  # tokens of every magnitude
    x[0, 0, 3] = 0  # a zero token
    q, scale = quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and int(q.abs().max()) == QMAX
    x16 = x.half().float()  # the stored float16 latents are what is quantised
    err = (dequantize(q, scale) - x16).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-7 * x16.abs()).all()
    cos, abs_err = token_errors(x, q, scale)
    assert cos[0, 0, 3] == 1.0 and cos.min() > 0.999
    assert torch.allclose(abs_err, (dequantize(q, scale) - x).abs().amax(-1))


def test_markers_hold_the_error_against_the_teacher(data):
    root, stats = data
    store = TargetStore.open(root / "int8.zarr")
    assert store.meta.latent_format == "int8"
    fp16 = TargetStore.open(root / "fp16.zarr")
    teacher = Teacher(SPEC)
    worst, total = 1.0, 0
    for name in store.unit_names():
        unit, ref = store.unit(name), fp16.unit(name)
        rec = unit.marker["quantization"]
        assert rec["format"] == "int8" and 0.999 <= rec["min_token_cosine"] <= rec["mean_token_cosine"] <= 1.0
        assert rec["max_abs_error"] > 0 and rec["worst"]["key"] in unit.keys
        assert unit.latents.dtype == np.int8 and unit.scales.shape == unit.latents.shape[:3]
        for row in np.flatnonzero(unit.valid):
            for k in range(2):
                # the fp16 store holds the teacher's output (test_extract checks it); int8 is within the recorded error
                int8, fp16_ = torch.from_numpy(unit.read(row, k)), torch.from_numpy(ref.read(row, k)).float()
                cos = F.cosine_similarity(int8, fp16_, dim=-1)
                assert cos.min() >= rec["min_token_cosine"] - 1e-3
                worst, total = min(worst, float(cos.min())), total + 1
    assert total == 56 and worst > 0.999  # 28 valid images x K = 2
    assert stats.quant.tokens == 56 * teacher.num_tokens and abs(stats.quant.min_cosine - min(
        store.marker(n)["quantization"]["min_token_cosine"] for n in store.unit_names())) < 1e-12
    report = verify_store(str(root / "int8.zarr"), str(root / "shards"), recompute=6)
    assert report.ok, report.summary()
    assert report.recomputed == 6 and report.min_cosine >= 0.999


def test_plain_zarr_reads_and_dequantizes_a_unit(data):
    root, _ = data
    name = TargetStore.open(root / "int8.zarr").unit_names()[0]
    g = zarr.open_group(str(root / "int8.zarr"), mode="r")
    q, scales = g[f"units/{name}/latents"][:], g[f"units/{name}/scales"][:]
    latents = q.astype(np.float32) * scales[..., None]  # the formula of docs/cache.md
    unit = TargetStore.open(root / "int8.zarr").unit(name)
    assert unit._fast is not None and unit._fast_scales is not None  # written and read as whole shard files
    assert np.array_equal(latents, np.stack([[unit.read(r, k) for k in range(2)] for r in range(len(unit))]))
    assert g.attrs["cae2"]["latent_format"] == "int8"


def test_min_cosine_one_fails_clearly(data, tmp_path):
    root, _ = data
    out = tmp_path / "strict.zarr"
    res = cli("extract-targets", "--shards", str(root / "shards"), "--out", str(out), "--teacher", TINY_TEACHER,
              "--pretrained", "none", "--views", "2", "--workers", "0", "--latent-format", "int8",
              "--min-cosine", "1.0")
    assert res.returncode == 1
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 5 and all("below --min-cosine 1.0" in line and "--latent-format fp16" in line
                                    for line in failed), res.stdout
    assert re.search(r"unit shard-\d+\.tar: int8 latents of key \S+ \(row \d+, view \d, token \d+\)", failed[0])
    assert "Traceback" not in res.stderr
    assert all(TargetStore.open(out).marker(n) is None for n in TargetStore.open(out).unit_names())


def test_converted_store_equals_and_trains_like_an_int8_extraction(data, tmp_path):
    root, _ = data
    dst = tmp_path / "converted.zarr"
    before = {n: _arrays(root / "fp16.zarr", n) for n in TargetStore.open(root / "fp16.zarr").unit_names()}
    res = cli("convert-targets", str(root / "fp16.zarr"), str(dst))
    assert res.returncode == 0, res.stderr
    assert "5 converted" in res.stdout and "min token cosine" in res.stdout
    for name, arrays in before.items():  # the source is untouched
        assert all(np.array_equal(v, _arrays(root / "fp16.zarr", name)[k]) for k, v in arrays.items())
        a, b = _arrays(dst, name), _arrays(root / "int8.zarr", name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    assert verify_store(str(dst), str(root / "shards")).ok
    losses = {}
    for name, store in (("extracted", root / "int8.zarr"), ("converted", dst)):
        run = tmp_path / f"run-{name}"
        res = cli("pretrain", "--shards", str(root / "shards"), "--targets", str(store), "--model", "cae2_debug",
                  "--out", str(run), "--steps", "3", "--batch-size", "4", "--workers", "1", "--log-every", "1",
                  "--allow-random-teacher", "--lr", "1e-3")
        assert res.returncode == 0, res.stderr[-2000:]
        assert "cache (int8)" in res.stderr
        losses[name] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses["extracted"] == losses["converted"]


@pytest.mark.slow
def test_kill_9_during_conversion_then_rerun_gives_the_same_store(tmp_path):
    write_good_images(tmp_path / "images", 40, sizes=((64, 64),))
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=1)  # 40 units
    _extract(tmp_path / "shards", tmp_path / "src.zarr", "fp16")
    ref = tmp_path / "ref.zarr"
    assert cli("convert-targets", str(tmp_path / "src.zarr"), str(ref)).returncode == 0
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "convert-targets", str(tmp_path / "src.zarr"),
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT,
                            start_new_session=True)
    assert hold_when(proc, lambda: len(list(out.glob("units/*/keys"))) >= 3)
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("units/*/keys")))
    assert 0 < done < 40, f"the kill landed with {done} of 40 units converted"
    res = cli("pretrain", "--shards", str(tmp_path / "shards"), "--targets", str(out), "--model", "cae2_debug",
              "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4", "--workers", "0",
              "--allow-random-teacher")
    assert res.returncode == 2 and f"rerun `cae2 convert-targets` into {out}" in res.stderr, res.stderr[-1000:]
    res = cli("convert-targets", str(tmp_path / "src.zarr"), str(out))
    assert res.returncode == 0, res.stderr
    assert "already complete" in res.stdout and not list(out.rglob("*.partial"))
    for name in TargetStore.open(ref).unit_names():
        a, b = _arrays(ref, name), _arrays(out, name)
        assert all(np.array_equal(a[k], b[k]) for k in a), name


def test_stage2_reads_int8_and_the_online_teacher_agrees_within_the_recorded_error(data):
    root, _ = data
    store = TargetStore.open(root / "int8.zarr")
    index = index_shards(store, expand_shards(str(root / "shards")))
    model_cfg = cae2.resolve_model_config("cae2_debug")
    batches = {}
    for online in (False, True):
        cfg = StreamConfig(batch_size=8, seed=0, workers=0, student_size=64, teacher_views=online)
        loader, _ = make_loader(store.path, store.meta, index, cfg, model_cfg, epoch=0)
        batches[online] = next(iter(loader))
    cached = batches[False]
    assert cached["targets"].dtype == torch.int8 and cached["target_scales"].dtype == torch.float32
    targets = dequantize(cached["targets"], cached["target_scales"])
    fresh = Teacher(SPEC)(batches[True]["teacher_images"])
    recorded = min(store.marker(n)["quantization"]["min_token_cosine"] for n in store.unit_names())
    assert F.cosine_similarity(fresh, targets, dim=-1).min() >= recorded - 1e-4


def test_bad_conversions_are_refused(data, tmp_path):
    root, _ = data
    for args, message in (([str(root / "int8.zarr"), str(tmp_path / "x.zarr")], "already holds int8"),
                          ([str(root / "fp16.zarr"), str(root / "fp16.zarr")], "overlaps SRC"),
                          ([str(root / "fp16.zarr"), str(tmp_path / "y.zarr"), "--latent-format", "fp16"],
                           "--latent-format must be one of int8"),
                          ([str(tmp_path / "missing.zarr"), str(tmp_path / "z.zarr")], "does not exist")):
        res = cli("convert-targets", *args)
        assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
