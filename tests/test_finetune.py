"""`cae2 evaluate finetune`: the recipe's parts (timm's), learning on colour classes, exact resume, ranks vs
accumulation, and one line for bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
from timm.optim import create_optimizer_v2

from pipelines.cli import run
from pipelines.evaluate.finetune_config import RECIPES
from pipelines.evaluate.finetune_model import build, load_source
from tests.fixtures import ACCELERATE_2CPU, ENV, ROOT, cli, colour_splits, hold_when, launch_errors, signal_job

MODEL = "timm:vit_tiny_patch16_224:random"


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_splits(tmp_path_factory.mktemp("colours"), 16, 8, 16, 8)


def _args(root: Path, out: Path, *extra, split: str = "") -> list[str]:
    """A quick run of the tiny recipe at 64 px (48 training images: 3 steps of 16 per epoch)."""
    return ["evaluate", "finetune", "--model", MODEL, "--train", str(root / f"{split}train"), "--val",
            str(root / f"{split}val"), "--out", str(out), "--input-size", "64", "--global-batch", "16",
            "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--log-every", "1", "--no-progress", *extra]


def test_layer_decay_groups_follow_the_formula():
    recipe = RECIPES["tiny"]
    net = build(load_source(MODEL, 0), 0, 10, 224, 0.0, True).net
    optimizer = create_optimizer_v2(net, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=recipe.layer_decay)
    names = {id(p): n for n, p in net.named_parameters()}
    depth, seen = len(net.blocks), set()

    def layer(name: str) -> int:  # BEiT's get_num_layer_for_vit: embeddings 0, block i -> i + 1, the rest last
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1

    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == pytest.approx(recipe.layer_decay ** (depth + 1 - layer(name))), name
            no_decay = p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed") or \
                "relative_position_bias_table" in name
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen.add(name)
    assert seen == {n for n, p in net.named_parameters() if p.requires_grad}
    assert min(g["lr_scale"] for g in optimizer.param_groups) == pytest.approx(0.75 ** 13)


@pytest.mark.slow
def test_colour_classes_are_learned_and_shuffled_labels_are_not(colours, tmp_path, capsys):
    assert run(_args(colours, tmp_path / "run", "--epochs", "10", "--rand-augment", "none", "--mixup", "0")) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["top1"] >= 90 and result["preset"] == "tiny" and len(result["history"]) == 10
    out = capsys.readouterr().out
    assert "fine-tuning" in out and "result.json" in out
    assert run(_args(colours, tmp_path / "shuffled", "--epochs", "10", "--rand-augment", "none", "--mixup", "0",
                     split="shuffled_")) == 0
    assert json.loads((tmp_path / "shuffled" / "result.json").read_text())["top1"] <= 60  # chance is 33%
    capsys.readouterr()
    assert run(["export", str(tmp_path / "run"), "--out", str(tmp_path / "ft.safetensors")]) == 0  # to timm
    from timm.models.beit import Beit

    with safetensors.safe_open(str(tmp_path / "ft.safetensors"), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    Beit(**kwargs).load_state_dict(safetensors.torch.load_file(str(tmp_path / "ft.safetensors")), strict=True)


def _sha(path: Path, prefix: str) -> str:
    h = hashlib.sha256()
    for k, v in sorted(safetensors.torch.load_file(str(path)).items()):
        if k.startswith(prefix):
            h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_kill_9_after_the_second_checkpoint_then_resume_equals_an_uninterrupted_run(colours, tmp_path):
    extra = ("--epochs", "6", "--save-every", "2", "--keep-last", "10")  # 18 steps, the recipe's augmentations
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli(*_args(colours, straight, *extra)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *_args(colours, killed, *extra)], env=ENV,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    assert hold_when(proc, lambda: len(list(killed.glob("checkpoints/*/COMPLETE"))) >= 2, timeout=600)
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists()
    res = cli(*_args(colours, killed, *extra, "--resume", "latest"))
    assert res.returncode == 0 and "resumed from" in res.stderr + res.stdout, res.stderr[-2000:]
    a, b = (json.loads((d / "result.json").read_text()) for d in (straight, killed))
    assert (a["top1"], a["top5"], a["history"]) == (b["top1"], b["top5"], b["history"])
    for prefix in ("head.", "blocks."):
        assert _sha(straight / "model.safetensors", prefix) == _sha(killed / "model.safetensors", prefix)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation(colours, tmp_path):
    extra = ("--epochs", "3", "--workers", "1")  # mixup, RandAugment and random erasing on, keyed
    one = cli(*_args(colours, tmp_path / "one", *extra))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*ACCELERATE_2CPU, "-m", "pipelines.cli", *_args(colours, tmp_path / "two", *extra)],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, launch_errors(two.stderr)
    assert "= 8 x 2 x 1" in two.stderr + two.stdout and "= 8 x 1 x 2" in one.stderr + one.stdout
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 9 and a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_bad_inputs_are_one_line(colours, tmp_path, capsys):
    def error(args) -> str:
        assert run(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1
        return err[0]

    odd = tmp_path / "odd_val"
    shutil.copytree(colours / "val", odd)
    (odd / "class_9").mkdir()
    shutil.copy(next((colours / "val" / "class_0").iterdir()), odd / "class_9" / "x.jpg")
    assert "class_9 are not in the training split's classes" in error(
        ["evaluate", "finetune", "--model", MODEL, "--train", str(colours / "train"), "--val", str(odd), "--out",
         str(tmp_path / "a")])
    assert "--preset base is the recipe for ViT-Base, but the model is 192-d" in error(
        _args(colours, tmp_path / "b", "--preset", "base"))
    assert "--rand-augment m9x" in error(_args(colours, tmp_path / "c", "--rand-augment", "m9x"))
    assert run(_args(colours, tmp_path / "d", "--epochs", "1", "--rand-augment", "none")) == 0
    capsys.readouterr()
    other = [a.replace(MODEL, "timm:vit_small_patch16_224:random") for a in
             _args(colours, tmp_path / "d", "--epochs", "2", "--resume", "latest")]
    assert "the checkpoint is of another run (model, width differ)" in error(other)
    assert timm.is_model("vit_small_patch16_224")
    # a fine-tuning run is a feature model for knn and linear (its network without the head); fine-tuning it again
    # is refused in one line
    for protocol in ("knn", "linear"):
        assert run(["evaluate", protocol, "--model", str(tmp_path / "d"), "--train", str(colours / "train"), "--val",
                    str(colours / "val"), "--workers", "0", "--out", str(tmp_path / f"{protocol}.json")]) == 0
        assert json.loads((tmp_path / f"{protocol}.json").read_text())["results"]
    capsys.readouterr()
    assert "is a fine-tuning run; fine-tune from the pretraining run" in error(
        [a.replace(MODEL, str(tmp_path / "d")) for a in _args(colours, tmp_path / "e", "--epochs", "1")])


def test_misclassified_validation_images_are_shown_with_the_encoders_pca_map(colours, tmp_path):
    """After each epoch TensorBoard gets the first misclassified validation images: exactly the ones the
    saved network gets wrong (recomputed here with timm), pixels as it saw them, beside a PCA map."""
    import io

    import numpy as np
    import torch
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from timm.data import create_transform
    from timm.models.beit import Beit

    from pipelines.evaluate.data import load_labelled

    out = tmp_path / "run"
    assert run(_args(colours, out, "--epochs", "1", "--misclassified", "3", split="shuffled_")) == 0
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    net = Beit(**json.loads(meta["timm_kwargs"])).eval()
    net.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")))
    val = load_labelled(str(colours / "shuffled_val"), "--val", classes=json.loads(meta["classes"]))
    source = load_source(MODEL, 0)  # the source's normalisation
    tf = create_transform(64, is_training=False, interpolation="bicubic", crop_pct=224 / 256, mean=source.mean,
                          std=source.std)
    images = torch.stack([tf(val.decode(i)) for i in range(len(val))])
    with torch.no_grad():
        wrong = (net(images).argmax(1) != torch.as_tensor(val.labels)).nonzero().flatten().tolist()
    assert len(wrong) >= 3, wrong  # shuffled labels: most are wrong
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = sorted(t for t in events.Tags()["images"] if t.startswith("misclassified/"))
    assert tags == ["misclassified/0", "misclassified/1", "misclassified/2"]
    mean, std = torch.tensor(source.mean).view(3, 1, 1), torch.tensor(source.std).view(3, 1, 1)
    for k, tag in enumerate(tags):
        picture = np.asarray(Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)).convert("RGB"))
        seen = ((images[wrong[k]] * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        height = picture.shape[0] - 8  # the sheet's gaps: the captioned view fills its cell's height
        view = picture[4:4 + 64, 4 + (height - 64) // 2:][:, :64]
        assert np.abs(view.astype(int) - seen.astype(int)).max() <= 1, tag
        pca = picture[4 + (height - 64) // 2:, 4 + height + 4:][:64, :64]
        assert pca.shape == (64, 64, 3) and pca.reshape(-1, 3).std(0).max() > 10  # a map, not a blank cell


def test_inspect_summarizes_a_finetuning_run(colours, tmp_path):
    """`cae2 inspect RUN_DIR` reads a fine-tuning run (no config.json): its options from the newest checkpoint,
    the validation accuracy that result.json reports, and curves with the accuracy; --misclassified 0 draws none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run(_args(colours, out, "--epochs", "2", "--misclassified", "0")) == 0
    result = json.loads((out / "result.json").read_text())
    res = cli("inspect", out, "--report", tmp_path / "r")
    assert res.returncode == 0, res.stderr
    assert f"run {out} (finetune)" in res.stdout and f"model       {MODEL}" in res.stdout
    assert f"val top-1 {result['top1']:.2f}% (epoch 2)" in res.stdout and "checkpoint  step_00000006" in res.stdout
    summary = json.loads(cli("inspect", out, "--json").stdout)
    assert summary["kind"] == "finetune" and summary["options"]["val"] == str(colours / "val")
    assert summary["accuracy"]["best"] == max(r["val_top1"] for r in result["history"])
    from PIL import Image

    assert Image.open(tmp_path / "r" / "curves.png").width >= 1400  # loss, lr and accuracy
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert not [t for t in events.Tags()["images"] if t.startswith("misclassified/")]
