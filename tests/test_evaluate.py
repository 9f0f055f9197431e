"""`cae2 evaluate`: k-NN against a brute-force reference, probes that separate what carries the label and
not what does not, every model source, the official protocol under 2 ranks with a kill -9, and k-NN
during pretraining that leaves the run unchanged."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

from cae2.errors import UserError
from pipelines.evaluate.data import load_labelled
from pipelines.evaluate.features import extract_features
from pipelines.evaluate.knn import knn_classify
from pipelines.evaluate.logistic import logistic_probe
from pipelines.evaluate.models import load_feature_model
from tests.fixtures import ACCELERATE_2CPU, ENV, ROOT, TINY_TEACHER, cli, launch_errors

TEACHER = f"clip:{TINY_TEACHER}:none"


def _reference_knn(train_f, train_l, val_f, val_l, k, num_classes, t=0.07):
    """One validation sample at a time, sorted neighbours, weighted votes, as in DINO's eval_knn."""
    top1 = top5 = 0
    tn = train_f / train_f.norm(dim=1, keepdim=True)
    for v, y in zip(val_f, val_l, strict=True):
        sims = tn @ (v / v.norm())
        order = sorted(range(len(sims)), key=lambda i: -float(sims[i]))[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_l[i])] += math.exp(float(sims[i]) / t)
        ranked = [c for c in sorted(range(num_classes), key=lambda c: -votes[c]) if votes[c] > 0]
        top1 += ranked[0] == int(y)
        top5 += int(y) in ranked[:min(5, k)]
    return 100.0 * top1 / len(val_l), 100.0 * top5 / len(val_l)


def test_knn_equals_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(70, 6, generator=g), torch.randn(31, 6, generator=g)
    train_l, val_l = torch.randint(0, 7, (70,), generator=g), torch.randint(0, 7, (31,), generator=g)
    got = knn_classify(train_f, train_l, val_f, val_l, 7, ks=(1, 3, 10, 20, 100), chunk=8)
    for k, (top1, top5) in got.items():
        ref = _reference_knn(train_f.double(), train_l, val_f.double(), val_l, min(k, 70), 7)
        assert (top1, top5) == pytest.approx(ref, abs=1e-9), k


def test_features_that_carry_the_label_score_high_and_random_ones_near_chance():
    g = torch.Generator().manual_seed(1)
    n, classes = 400, 5
    labels = torch.randint(0, classes, (n,), generator=g)
    carrying = F.one_hot(labels, classes).float() * 4 + torch.randn(n, classes, generator=g)
    noise = torch.randn(n, 16, generator=g)
    split = 300
    for feats, lo, hi in ((carrying, 85, 100), (noise, 0, 40)):
        knn = knn_classify(feats[:split], labels[:split], feats[split:], labels[split:], classes, ks=(20,))[20][0]
        lin = logistic_probe(feats[:split], labels[:split], feats[split:], labels[split:], classes, iters=50)["top1"]
        assert lo <= knn <= hi and lo <= lin <= hi, (knn, lin)


@pytest.fixture(scope="module")
def run(corpus, tiny_run):
    """The corpus: shards, its store (t.zarr), a two-step cae2_debug run and its exported encoder."""
    return corpus


def test_every_model_source_loads(run, labelled):
    data = load_labelled(str(labelled / "val"), "--val")
    feats = {}
    ckpt = sorted((run / "run" / "checkpoints").iterdir())[-1]
    specs = (str(run / "run"), str(ckpt), str(run / "enc.safetensors"), TEACHER, "timm:vit_tiny_patch16_224:random")
    for spec in specs:
        model = load_feature_model(spec)
        for pool in ("cls", "avg", "cls+avg"):
            f, labels = extract_features(model, data, pool, batch_size=5)
            assert f.shape[0] == len(data) == len(labels) and torch.isfinite(f).all()
        feats[spec] = extract_features(model, data, "cls")[0]
        assert len(model.sha256) == 64
    # the run, its checkpoint and its export are the same encoder
    assert torch.allclose(feats[str(run / "run")], feats[str(ckpt)])
    assert torch.allclose(feats[str(run / "run")], feats[str(run / "enc.safetensors")], atol=1e-5)


def test_bad_inputs_give_one_clear_line(run, labelled, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes((labelled / "val" / "class_0" / "img_0_000.jpg").read_bytes())
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    (one / "only" / "a.jpg").write_bytes((labelled / "val" / "class_0" / "img_0_000.jpg").read_bytes())
    other = tmp_path / "other"
    (other / "zebra").mkdir(parents=True)
    (other / "zebra" / "a.jpg").write_bytes((labelled / "val" / "class_0" / "img_0_000.jpg").read_bytes())
    with pytest.raises(UserError, match="no class folders"):
        load_labelled(str(flat), "--train")
    with pytest.raises(UserError, match="one class only"):
        load_labelled(str(one), "--train")
    with pytest.raises(UserError, match="zebra are not in the training split"):
        load_labelled(str(other), "--val", classes=["class_0", "class_1"])
    for spec, message in (("timm:no_such_model_xyz", "timm has no model"),
                          ("timm:vit_tiny_patch16_224", "cannot be loaded"),  # offline: no pretrained weights
                          ("clip:ViT-B-16", "clip:MODEL:WEIGHTS"), (str(tmp_path / "nothing"), "not a run"),
                          (str(tmp_path / "missing.safetensors"), "no such file")):
        with pytest.raises(UserError, match=message):
            load_feature_model(spec)
    # a checkpoint of another shape: the exported weights under another model description
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "enc.safetensors"))
    with safe_open(str(run / "enc.safetensors"), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    save_file(state, str(tmp_path / "wrong.safetensors"), metadata={"timm_kwargs": json.dumps(kwargs | {"depth": 3})})
    with pytest.raises(UserError, match="do not fit"):
        load_feature_model(str(tmp_path / "wrong.safetensors"))
    res = cli("evaluate", "knn", "--model", "timm:nope_nope", "--train", str(labelled / "train"), "--val",
              str(labelled / "val"), "--out", str(tmp_path / "r.json"))
    assert res.returncode == 2 and "timm has no model" in res.stderr and "Traceback" not in res.stderr


def test_cli_knn_and_linear_write_every_number_and_setting(labelled, tmp_path):
    out = tmp_path / "knn.json"
    args = ["--model", TEACHER, "--train", str(labelled / "train"), "--val", str(labelled / "val"), "--workers", "0",
            "--cache-dir", str(tmp_path / "cache")]
    res = cli("evaluate", "knn", *args, "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"10", "20", "100", "200"} and record["temperature"] == 0.07
    assert record["pool"] == "cls" and record["train"]["images"] == 36 and len(record["model_sha256"]) == 64
    assert record["results"]["10"]["top1"] >= 90  # the teacher's features carry the colour; chance is 33%
    assert "k = 20" in res.stdout and list((tmp_path / "knn-tensorboard").iterdir())
    again = cli("evaluate", "knn", *args, "--out", str(tmp_path / "knn2.json"), "--pool", "cls")
    assert "(cached)" in again.stderr
    lin = cli("evaluate", "linear", "--protocol", "features", *args, "--out", str(tmp_path / "lin.json"))
    assert lin.returncode == 0, lin.stderr[-2000:]
    rec = json.loads((tmp_path / "lin.json").read_text())
    assert rec["protocol"] == "features" and rec["results"]["top1"] >= 90 and rec["results"]["l2"] > 0
    shuffled = cli("evaluate", "knn", "--model", TEACHER, "--train", str(labelled / "shuffled_train"), "--val",
                   str(labelled / "shuffled_val"), "--workers", "0", "--out", str(tmp_path / "shuffled.json"))
    assert shuffled.returncode == 0, shuffled.stderr[-2000:]
    assert json.loads((tmp_path / "shuffled.json").read_text())["results"]["20"]["top1"] <= 55  # labels carry nothing


def test_official_protocol_in_one_process_records_its_run(labelled, tmp_path):
    out = tmp_path / "probe.json"
    res = cli("evaluate", "linear", "--protocol", "official", "--model", TEACHER, "--train", labelled / "train",
              "--val", labelled / "val", "--out", out, "--workers", "0", "--epochs", "3", "--warmup-epochs", "1",
              "--batch-size", "8", "--global-batch", "16", "--save-every", "2", "--log-every", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())["results"]
    assert result["steps"] == 6 and result["grad_accum"] == 2 and 0 <= result["top1"] <= 100
    run = tmp_path / "probe-run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 7)) and "val/top1" in records[-1]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000004", "step_00000006"]
    again = cli("evaluate", "linear", "--protocol", "official", "--model", TEACHER, "--train", labelled / "train",
                "--val", labelled / "val", "--out", tmp_path / "again.json", "--run-dir", run, "--workers", "0",
                "--epochs", "3", "--batch-size", "8", "--global-batch", "16")
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    summary = json.loads(cli("inspect", run, "--json").stdout)  # the probe's run dir reads as a run
    assert summary["kind"] == "linear probe (official)" and summary["newest_checkpoint"] == "step_00000006"
    assert summary["last_metrics"]["step"] == 6 and summary["accuracy"]["last"] == pytest.approx(result["top1"])


def _official(labelled, out, *extra):
    return [*ACCELERATE_2CPU, "-m", "pipelines.cli", "evaluate", "linear", "--protocol", "official", "--model", TEACHER,
            "--train", str(labelled / "train"), "--val", str(labelled / "val"), "--out", str(out), "--workers", "0",
            "--epochs", "30", "--warmup-epochs", "2", "--batch-size", "4", "--global-batch", "16", "--save-every", "3",
            *extra]


@pytest.mark.slow
def test_official_protocol_on_two_ranks_resumes_exactly_after_kill_9(labelled, tmp_path):
    ref = tmp_path / "ref.json"
    res = subprocess.run(_official(labelled, ref), capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert res.returncode == 0, launch_errors(res.stderr)
    a = json.loads(ref.read_text())["results"]
    assert a["processes"] == 2 and a["grad_accum"] == 2 and a["steps"] == 60
    out = tmp_path / "killed.json"
    proc = subprocess.Popen(_official(labelled, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            cwd=ROOT, start_new_session=True)
    ckpts = tmp_path / "killed-run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.is_dir() and len([p for p in ckpts.iterdir()
                                                                  if (p / "COMPLETE").exists()]) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the kill landed after the run finished"
    res = subprocess.run(_official(labelled, out, "--resume", "latest"), capture_output=True, text=True, timeout=600,
                         env=ENV, cwd=ROOT)
    assert res.returncode == 0, launch_errors(res.stderr)
    b = json.loads(out.read_text())["results"]
    assert b["head_sha256"] == a["head_sha256"] and (b["top1"], b["top5"]) == (a["top1"], a["top5"])


def test_pretrain_knn_monitor_leaves_the_run_unchanged(run, labelled, tmp_path):
    eval_data = tmp_path / "eval"
    eval_data.mkdir()
    (eval_data / "train").symlink_to(labelled / "train")
    (eval_data / "val").symlink_to(labelled / "val")
    args = ["pretrain", "--shards", str(run / "shards"), "--targets", str(run / "targets.zarr"), "--model",
            "cae2_debug",
            "--steps", "4", "--batch-size", "4", "--workers", "1", "--log-every", "1", "--allow-random-teacher",
            "--lr", "1e-3"]
    plain = cli(*args, "--out", str(tmp_path / "plain"))
    watched = cli(*args, "--out", str(tmp_path / "watched"), "--eval-every", "2", "--eval-data", str(eval_data))
    assert plain.returncode == 0 and watched.returncode == 0, watched.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    losses = {p: [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / p / "metrics.jsonl").read_text()
                                                      .splitlines()) if "loss" in r] for p in ("plain", "watched")}
    assert losses["plain"] == losses["watched"]
    bad = cli(*args, "--out", str(tmp_path / "bad"), "--eval-every", "2")
    assert bad.returncode == 2 and "--eval-data" in bad.stderr


def test_the_image_check_is_done_once_per_set_of_files(labelled, tmp_path, caplog, monkeypatch):
    """The header check of every file is kept in the local cache under the files' identity: a second load of
    the same files reads no image, a changed file is checked again."""
    import shutil

    from pipelines.evaluate.data import LabelledImages
    from targets.local_copies import cache_root

    train = tmp_path / "train"
    shutil.copytree(labelled / "train", train)
    (train / "class_0" / "notes.jpg").write_text("not a picture")
    reads = []
    load = LabelledImages.load
    monkeypatch.setattr(LabelledImages, "load", lambda self, i, limit=None: reads.append(i) or load(self, i, limit))
    first = load_labelled(str(train), "--train")
    assert len(reads) >= len(first) + 1 and list((cache_root() / "image-checks").glob("*.json"))
    reads.clear()
    with caplog.at_level("WARNING"):
        again = load_labelled(str(train), "--train")
    assert reads == [] and again.labels.tolist() == first.labels.tolist() and again.paths == first.paths
    assert "skipped 1 of" in caplog.text and "notes.jpg" in caplog.text  # said again, from the record
    bad = sorted((train / "class_1").glob("*.jpg"))[0]
    bad.write_bytes(b"broken since")  # another size and time: a new identity, checked again
    os.utime(bad, ns=(1, 1))
    third = load_labelled(str(train), "--train")
    assert len(reads) >= len(third) + 2 and len(third) == len(first) - 1


def test_files_that_are_not_images_are_skipped_and_counted_and_unlabelled_shards_named(labelled, tmp_path, caplog):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(labelled / "train", train)
    (train / "class_0" / "notes.jpg").write_text("not a picture")
    (train / "class_1" / "empty.jpg").write_bytes(b"")
    whole = load_labelled(str(labelled / "train"), "--train")
    with caplog.at_level("WARNING"):
        data = load_labelled(str(train), "--train")
    assert len(data) == len(whole) and data.labels.tolist() == whole.labels.tolist()
    assert "skipped 2 of" in caplog.text and "files that are not images" in caplog.text
    model = load_feature_model(TEACHER)
    assert extract_features(model, data, "cls")[0].shape[0] == len(whole)
    # shards of a flat folder carry cls -1: said as such, not "one class only"
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((labelled / "train").rglob("*.jpg"))[:6]:
        shutil.copy(p, flat / p.name)
    assert cli("make-shards", flat, tmp_path / "shards").returncode == 0
    with pytest.raises(UserError, match="these shards carry no labels"):
        load_labelled(str(tmp_path / "shards" / "shard-000000.tar"), "--train")
