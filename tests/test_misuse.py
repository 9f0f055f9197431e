"""The rows of the misuse probe (docs/reliability.md): each is reproduced here and now gives one line (or
the correct result) with the documented exit status."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

import cae2
from cae2.errors import UserError
from pipelines import cli as cli_module
from pipelines.cli import run
from pipelines.evaluate.models import load_feature_model
from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.schedule import Schedule
from tests.fixtures import ACCELERATE_2CPU, ENV, ROOT, TINY_TEACHER, cli, colour_classes

TEACHER = f"clip:{TINY_TEACHER}:none"


@pytest.fixture(scope="module")
def data(corpus, tiny_run, labelled):
    """The session's shards, their store, a short run (DATA/run) and labelled images (DATA/labelled)."""
    if not (corpus / "labelled").exists():
        (corpus / "labelled").symlink_to(labelled)
    return corpus


def _pretrain(root: Path, out: Path, *extra) -> list[str]:
    return ["pretrain", "--shards", str(root / "shards"), "--targets", str(root / "targets.zarr"), "--model",
            "cae2_debug",
            "--out", str(out), "--batch-size", "4", "--workers", "0", "--allow-random-teacher", "--lr", "1e-3",
            "--no-progress", *extra]


def _one_line(capsys) -> str:
    return _one_line_of(capsys.readouterr().err)


def _one_line_of(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_feature_cache_is_keyed_by_the_files_not_their_count(data, tmp_path, capsys):
    labelled = tmp_path / "labelled"
    shutil.copytree(data / "labelled", labelled)
    args = ["evaluate", "knn", "--model", TEACHER, "--train", str(labelled / "train"), "--val", str(labelled / "val"),
            "--workers", "0", "--ks", "1", "--cache-dir", str(tmp_path / "cache")]
    assert run([*args, "--out", str(tmp_path / "a.json")]) == 0
    a, b = labelled / "val" / "class_0", labelled / "val" / "class_1"
    a.rename(labelled / "val" / "tmp")
    b.rename(a)
    (labelled / "val" / "tmp").rename(b)  # the same count of images, the labels of two classes swapped
    assert run([*args, "--out", str(tmp_path / "cached.json")]) == 0
    assert run([*args[:-2], "--out", str(tmp_path / "fresh.json")]) == 0
    capsys.readouterr()
    cached, fresh = (json.loads((tmp_path / f).read_text())["results"]["1"] for f in ("cached.json", "fresh.json"))
    assert cached == fresh


def test_a_random_timm_baseline_is_the_same_in_every_run_of_one_seed():
    a, b = (load_feature_model("timm:vit_tiny_patch16_224:random", seed=3) for _ in range(2))
    c = load_feature_model("timm:vit_tiny_patch16_224:random", seed=4)
    assert a.sha256 == b.sha256 != c.sha256


def test_a_peak_lr_below_the_final_lr_is_refused():
    preset = cae2.get_preset("cae2_vit_tiny").train  # lr 1.5e-3 at 2048 -> 2.9e-6 at batch 4, min lr 1e-5
    with pytest.raises(UserError, match="not above the final lr"):
        Schedule.resolve(TrainConfig(shards="s", targets="t", batch_size=4, steps=10), preset, 10, 1)
    Schedule.resolve(TrainConfig(shards="s", targets="t", batch_size=4, steps=10, min_lr=1e-7), preset, 10, 1)


def test_pretrain_out_is_never_the_store_or_a_folder_of_other_files(data, tmp_path, capsys):
    assert run(_pretrain(data, data / "targets.zarr", "--steps", "1")) == 2
    assert "overlap" in _one_line(capsys)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    assert run(_pretrain(data, other, "--steps", "1")) == 2
    assert "not a cae2 run" in _one_line(capsys) and sorted(os.listdir(other)) == ["holiday.jpg"]


def test_export_to_an_unwritable_place_is_one_line_and_files_follow_the_umask(data, tmp_path, capsys):
    assert run(["export", str(data / "run"), "--out", str(tmp_path)]) == 2
    assert "is a directory" in _one_line(capsys)
    assert run(["export", str(data / "run"), "--out", "/proc/x.safetensors"]) == 2
    assert "/proc/x.safetensors" in _one_line(capsys)
    old = os.umask(0o022)
    try:
        assert run(["export", str(data / "run"), "--out", str(tmp_path / "e.safetensors")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    files = [tmp_path / "e.safetensors", *(p for p in (data / "run" / "checkpoints").rglob("*") if p.is_file())]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o644"}


def test_evaluation_errors_name_the_fix(data, tmp_path, capsys):
    labelled = data / "labelled"
    base = ["evaluate", "knn", "--train", str(labelled / "train"), "--val", str(labelled / "val"), "--out",
            str(tmp_path / "k.json")]
    if not torch.cuda.is_available():
        assert run([*base, "--model", TEACHER, "--device", "cuda"]) == 2
        assert "no GPU" in _one_line(capsys)
    assert run([*base, "--model", "clip:ViT-B-16:openai"]) == 2
    line = _one_line(capsys)
    assert "clip:ViT-B-16:/path/to/weights" in line and "--pretrained" not in line
    assert run([*base, "--model", TEACHER, "--config", str(tmp_path)]) == 2
    assert "is a directory; pass a YAML or TOML file" in _one_line(capsys)
    assert not (tmp_path / "k.json").exists()


def test_a_clip_weights_file_open_clip_does_not_know_is_evaluated_with_quick_gelu_stated(data, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    open_clip.add_model_config(ROOT / "targets" / "configs" / f"{TINY_TEACHER}.json")
    torch.save(open_clip.create_model(TINY_TEACHER).state_dict(), weights)  # the whole model, as a release holds it
    base = ["evaluate", "knn", "--model", f"clip:{TINY_TEACHER}:{weights}", "--train",
            str(data / "labelled" / "train"), "--val", str(data / "labelled" / "val"), "--workers", "0", "--ks", "5"]
    assert run([*base, "--out", str(tmp_path / "a.json")]) == 2
    assert "--no-quick-gelu" in _one_line(capsys)
    assert run([*base, "--no-quick-gelu", "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["model_sha256"]


@pytest.mark.slow
def test_evaluate_a_vit_b_16_weights_file_with_no_quick_gelu(tmp_path):
    weights = tmp_path / "b16.pt"
    torch.save(open_clip.create_model("ViT-B-16").state_dict(), weights)
    colour_classes(tmp_path / "train", 2, seed=1)  # a few images: ViT-B/16 takes ~0.3 s per image here
    colour_classes(tmp_path / "val", 1, seed=2)
    res = cli("evaluate", "knn", "--model", f"clip:ViT-B-16:{weights}", "--no-quick-gelu", "--train",
              tmp_path / "train", "--val", tmp_path / "val", "--workers", "0", "--ks", "5", "--out",
              tmp_path / "k.json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "k.json").read_text())["feature_dim"] == 512


def test_a_teacher_image_size_off_the_patch_grid_is_one_line(data, tmp_path, capsys):
    status = run(["extract-targets", "--shards", str(data / "shards"), "--out", str(tmp_path / "s.zarr"), "--teacher",
                  "ViT-B-16", "--pretrained", "none", "--teacher-image-size", "100"])
    assert status == 2 and "not a multiple of ViT-B-16's patch size 16" in _one_line(capsys)
    assert not (tmp_path / "s.zarr").exists()


def test_a_truncated_tar_shard_is_named_without_internals(data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    tar = sorted(shards.glob("*.tar"))[1]
    data_ = tar.read_bytes()
    tar.write_bytes(data_[:len(data_) // 2 + 100])  # cut inside a member
    status = run(["extract-targets", "--shards", str(shards), "--out", str(tmp_path / "s.zarr"), "--teacher",
                  TINY_TEACHER, "--pretrained", "none", "--views", "2", "--workers", "0"])
    out = capsys.readouterr().out
    assert status == 1 and f"FAILED: shard {tar}" in out and "BufferedReader" not in out and "(\"" not in out


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_says_so_and_resumes(data, tmp_path):
    out = tmp_path / "run"
    # a loader worker too: it leaves Ctrl-C to the main process
    cmd = [sys.executable, "-m", "pipelines.cli", *_pretrain(data, out, "--save-every", "1000", "--workers", "1")]
    proc = subprocess.Popen([*cmd, "--steps", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-1500:]
    assert "interrupted at step" in stdout and "--resume latest" in stdout and "Traceback" not in stderr
    step = int(stdout.split("interrupted at step ")[1].split(":")[0])
    assert 0 < step < 400 and (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    res = cli(*cmd[3:], "--steps", str(step + 2), "--resume", "latest")
    assert res.returncode == 0 and f"resumed from {out / 'checkpoints'}" in res.stderr, res.stderr[-1500:]


@pytest.mark.slow
def test_a_failure_under_cae2_launch_is_one_line_per_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "launch", *ACCELERATE_2CPU[4:], "verify-targets",
                          str(tmp_path / "missing.zarr")], capture_output=True, text=True, env=ENV, cwd=ROOT,
                         timeout=300)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "launch failed: rank 0 exited with status 2 (its error line above says why)" in lines[-1], lines[-1]
    assert all(line.startswith("error:") for line in lines) and any("does not exist" in line for line in lines)


@pytest.mark.parametrize("error, shown", [(OSError(5, "Input/output error"), False), (ValueError("bug"), True)])
def test_sibling_read_errors_left_by_zarr_are_not_printed_after_the_error_line(error, shown, caplog):
    """zarr gathers a chunk's reads and raises the first EIO; asyncio would print the others' tracebacks when
    their futures are collected. The CLI drops those OSErrors (the error line said it) and nothing else."""
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(cli_module._said_already)
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.set_exception(error)
        del future
        gc.collect()
    finally:
        loop.close()
        asyncio_log.removeFilter(cli_module._said_already)
    said = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert any("exception was never retrieved" in m for m in said) == shown, said


def test_cae2_launch_without_a_command_or_with_bad_options_is_one_line():
    res = cli("launch", "--num_processes", "2")
    assert res.returncode == 2 and res.stderr.startswith("error: cae2 launch: name the command to launch")
    res = cli("launch", "--num_processes", "two", "models")
    assert res.returncode == 2 and "accelerate's options above do not parse" in res.stderr


def test_a_sigterm_while_the_error_line_is_being_said_does_not_cut_it_off(tmp_path, capsys, monkeypatch):
    """A launcher stops every rank with SIGTERM once one has failed; a rank that is saying its own error then
    still says it and exits 2 (not 143 with nothing said)."""
    release = cli_module._release_frames

    def terminated_meanwhile(error: BaseException) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the except clause, before the error line is written
        release(error)

    monkeypatch.setattr(cli_module, "_release_frames", terminated_meanwhile)
    status = run(["inspect", str(tmp_path / "missing.zarr")])
    err = capsys.readouterr().err
    assert status == 2 and "missing.zarr" in _one_line_of(err) and "SIGTERM" not in err, err

