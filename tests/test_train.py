"""Stage 2 on real shards, a real store, tiny models, real Accelerate (plain and 2-process launches)."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import cae2
from cae2.encoder import timm_kwargs
from pipelines.evaluate.alignment import alignment_cosine
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.pretrain.data import StreamConfig, index_shards, make_loader
from pipelines.pretrain.export import load_model
from pipelines.shards import expand_shards, make_shards
from targets.store import TargetStore
from targets.teacher import Teacher, TeacherSpec
from tests.fixtures import (
    ACCELERATE_2CPU,
    ENV,
    ROOT,
    TINY_TEACHER,
    cli,
    hold_when,
    launch_errors,
    signal_job,
    write_good_images,
)

SPEC = TeacherSpec(name=TINY_TEACHER, pretrained="none")


def _extract(shards: Path, out: Path, k: int = 2) -> Path:
    run_extract(ExtractConfig(shards=str(shards), out=str(out), teacher=SPEC, views_per_image=k, workers=0,
                              progress=False))
    return out


@pytest.fixture(scope="module")
def data(corpus):
    """The session's corpus: 6 shards (52 valid samples), their store (K = 2), held-out shards and store."""
    return corpus


def pretrain_args(data, out, *extra, steps=20):
    return ["pretrain", "--shards", str(data / "shards"), "--targets", str(data / "targets.zarr"),
            "--model", "cae2_debug", "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--workers", "2",
            "--log-every", "1", "--warmup-steps", "3", "--lr", "2e-3", "--allow-random-teacher", *extra]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def test_end_to_end_loss_falls_and_heldout_alignment_rises(data, tmp_path):
    run = tmp_path / "run"
    res = cli(*pretrain_args(data, run, "--save-every", "1000", steps=30))
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("loss", "loss_v", "loss_z", "lr", "grad_norm", "samples_per_s", "data_wait_frac"):
        assert all(np.isfinite(r[key]) for r in records), key
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < first - 0.05, (first, last)
    config = json.loads((run / "config.json").read_text())
    assert config["derived"]["global_batch"] == 4 and config["git_sha"]
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    store = TargetStore.open(data / "heldout.zarr")
    torch.manual_seed(0)
    from accelerate.utils import set_seed

    set_seed(0)
    initial = cae2.CAEv2(cae2.resolve_model_config("cae2_debug"))  # the run's initial weights (same seed)
    trained = load_model(run)
    before = alignment_cosine(initial, store, str(data / "heldout"))
    after = alignment_cosine(trained, store, str(data / "heldout"))
    assert after > before + 0.1, (before, after)


@pytest.mark.slow
def test_resume_after_kill_9_reproduces_every_loss(data, tmp_path):
    straight = tmp_path / "straight"
    assert cli(*pretrain_args(data, straight, "--save-every", "10")).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *pretrain_args(data, killed, "--save-every", "10")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT,
                            start_new_session=True)
    marker = killed / "checkpoints" / "step_00000010" / "COMPLETE"
    assert hold_when(proc, marker.exists)
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    negative = tmp_path / "negative"  # same checkpoint, data position dropped
    shutil.copytree(killed / "checkpoints" / "step_00000010", negative / "checkpoints" / "step_00000010")
    state = json.loads((negative / "checkpoints/step_00000010/trainer_state.json").read_text())
    assert state["batch_in_epoch"] > 0  # mid-epoch (13 micro-batches per epoch)
    state["batch_in_epoch"] = 0
    (negative / "checkpoints/step_00000010/trainer_state.json").write_text(json.dumps(state))

    res = cli(*pretrain_args(data, killed, "--save-every", "10", "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]

    assert cli(*pretrain_args(data, negative, "--save-every", "10", "--resume", "latest")).returncode == 0
    c = losses(negative)
    assert any(a[s] != c[s] for s in range(11, 21)), "the negative control must differ"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli",
                             *pretrain_args(data, run, "--save-every", "1000", steps=500)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and
                                          len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted at step" in out
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").exists()
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= step < 500
    res = cli(*pretrain_args(data, run, "--resume", "latest", steps=step + 2))
    assert res.returncode == 0 and f"finished {step + 2} steps" in res.stdout, res.stderr[-2000:]


def test_export_loads_into_timm_with_equal_features(data, tmp_path):
    run = tmp_path / "run"
    assert cli(*pretrain_args(data, run, steps=3)).returncode == 0
    res = cli("export", str(run), "--out", str(tmp_path / "enc.safetensors"))
    assert res.returncode == 0 and "strict=True" in res.stdout
    model = load_model(run).eval()
    state = load_file(str(tmp_path / "enc.safetensors"))
    assert not any(k.startswith(("head", "regressor", "mask_token")) for k in state)
    vit = VisionTransformer(**timm_kwargs(model.cfg)).eval()
    vit.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = model.encode_visible(x, torch.zeros(3, model.cfg.num_patches, dtype=torch.bool))
        assert (ours - vit.forward_features(x)).abs().max() <= 1e-5
    # no command writes into what another made: the checkpoint, the run dir, the export's own input
    weights = run / "checkpoints" / "step_00000003" / "model.safetensors"
    before = weights.read_bytes()
    for out in (weights, run / "enc.safetensors", data / "targets.zarr" / "enc.safetensors"):
        res = cli("export", str(run), "--out", str(out))
        assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1
        assert f"--out {out}" in res.stderr and ("inside the" in res.stderr or "overlaps" in res.stderr), res.stderr
    assert weights.read_bytes() == before
    # a checkpoint whose weights were replaced (by the encoder alone) is named in one line, not passed over
    shutil.copy(tmp_path / "enc.safetensors", weights)
    res = cli(*pretrain_args(data, run, "--resume", "latest", steps=5))
    assert res.returncode == 2 and "does not fit this run's model" in res.stderr and "missing (e.g." in res.stderr
    assert len([line for line in res.stderr.splitlines() if "missing" in line.lower()]) == 1, res.stderr[-3000:]


def test_teacher_online_gives_the_cached_targets(data, tmp_path):
    store = TargetStore.open(data / "targets.zarr")
    index = index_shards(store, expand_shards(str(data / "shards")))
    model_cfg = cae2.resolve_model_config("cae2_debug")
    batches = {}
    for online in (False, True):
        cfg = StreamConfig(batch_size=8, seed=0, workers=0, student_size=64, teacher_views=online)
        loader, _ = make_loader(store.path, store.meta, index, cfg, model_cfg, epoch=1)
        batches[online] = next(iter(loader))
    cached, online = batches[False], batches[True]
    assert cached["keys"] == online["keys"] and cached["views"] == online["views"]
    assert torch.equal(cached["images"], online["images"]) and torch.equal(cached["mask"], online["mask"])
    teacher = Teacher(SPEC)
    fresh = teacher(online["teacher_images"])
    cos = F.cosine_similarity(fresh, cached["targets"].float(), dim=-1)
    assert cos.min() >= 0.9999
    # and the training loop with --teacher-online gives the same first-step loss
    a, b = tmp_path / "cached", tmp_path / "online"
    assert cli(*pretrain_args(data, a, steps=2)).returncode == 0
    res = cli(*pretrain_args(data, b, "--teacher-online", steps=2))
    assert res.returncode == 0, res.stderr[-2000:]
    assert abs(losses(a)[1] - losses(b)[1]) < 1e-3


def test_device_view_path_trains_like_the_pillow_path(data, tmp_path):
    """The device path (run here on CPU tensors) gives the student and the online teacher the same
    views, so training and the first steps' losses are the same."""
    from targets.device_views import DeviceViews

    store = TargetStore.open(data / "targets.zarr")
    index = index_shards(store, expand_shards(str(data / "shards")))
    model_cfg = cae2.resolve_model_config("cae2_debug")
    for online in (False, True):
        batches = {}
        for path in ("pillow", "device"):
            cfg = StreamConfig(batch_size=8, seed=0, workers=0, student_size=64, teacher_views=online, view_path=path)
            loader, _ = make_loader(store.path, store.meta, index, cfg, model_cfg, epoch=1)
            batches[path] = next(iter(loader))
        pillow, device = batches["pillow"], batches["device"]
        assert pillow["keys"] == device["keys"] and torch.equal(pillow["mask"], device["mask"])
        assert "images" not in device and len(device["view_ints"]) == len(device["keys"])
        views = DeviceViews(64, "bicubic").render(device["view_pack"], torch.arange(len(device["keys"])),
                                                  device["view_ints"], device["view_floats"])
        assert torch.equal(views, pillow["images"])
        if not online:
            assert torch.equal(device["targets"], pillow["targets"])
    a, b = tmp_path / "pillow", tmp_path / "device"
    assert cli(*pretrain_args(data, a, "--view-path", "pillow", steps=3)).returncode == 0
    res = cli(*pretrain_args(data, b, "--view-path", "device", steps=3))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "device view path" in res.stderr and "bit-identical" in res.stderr
    assert losses(a) == losses(b)


def _other_store(data, tmp_path):
    write_good_images(tmp_path / "other", 9, seed=5)
    make_shards(tmp_path / "other", tmp_path / "other_shards", samples_per_shard=9, prefix="other")
    return _extract(tmp_path / "other_shards", tmp_path / "other.zarr")


@pytest.mark.parametrize("case", ["other_shards", "grid", "dim", "incomplete", "random_teacher", "corrupt_ckpt",
                                  "layout_changed"])
def test_bad_inputs_fail_before_the_first_step(case, data, tmp_path):
    run = tmp_path / "run"
    args = pretrain_args(data, run, steps=2)
    expected = {"other_shards": "not in the target store", "grid": "patch grid is 4x4",
                "dim": "--target-dim 32", "incomplete": "incomplete in the target store",
                "random_teacher": "--allow-random-teacher", "corrupt_ckpt": "is corrupt",
                "layout_changed": "batch_size: checkpoint 4, now 5"}[case]
    if case == "other_shards":
        args[args.index("--targets") + 1] = str(_other_store(data, tmp_path))
    elif case == "grid":
        args[args.index("--model") + 1] = "cae2_vit_tiny"
        args += ["--target-dim", "32"]
    elif case == "dim":
        args += ["--target-dim", "48"]
    elif case == "incomplete":
        copy = tmp_path / "incomplete.zarr"
        shutil.copytree(data / "targets.zarr", copy)
        meta = copy / "units" / "shard-000002.tar" / "zarr.json"
        doc = json.loads(meta.read_text())
        del doc["attributes"]["complete"]
        meta.write_text(json.dumps(doc))
        args[args.index("--targets") + 1] = str(copy)
    elif case == "random_teacher":
        args.remove("--allow-random-teacher")
    elif case == "corrupt_ckpt":
        assert cli(*args).returncode == 0
        ckpt = run / "checkpoints" / "step_00000002"
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        args = pretrain_args(data, run, "--resume", "latest", steps=4)
    elif case == "layout_changed":
        assert cli(*args).returncode == 0
        args = pretrain_args(data, run, "--resume", "latest", "--batch-size", "5", steps=4)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} if run.exists() else {}
    res = cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], res.stderr[-2000:]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} if run.exists() else {}
    assert before == after  # nothing written, nothing overwritten


@pytest.mark.slow
def test_two_processes_equal_steps_and_each_sample_once_per_epoch(data, tmp_path):
    run = tmp_path / "run"
    res = subprocess.run([*ACCELERATE_2CPU, "-m", "pipelines.cli",
                          *pretrain_args(data, run, "--log-keys", "--batch-size", "3", steps=24)],
                         capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert res.returncode == 0, launch_errors(res.stderr)
    assert "on 2 process(es)" in res.stderr
    per_rank = {}
    for r in (0, 1):
        rows = [line.split() for line in (run / "keys" / f"rank{r}.txt").read_text().splitlines()]
        per_rank[r] = rows
    steps = {r: sorted({int(s) for s, _, _ in rows}) for r, rows in per_rank.items()}
    assert steps[0] == steps[1] == list(range(24))  # equal steps on every rank
    by_epoch = defaultdict(list)
    for rows in per_rank.values():
        for _, epoch, key in rows:
            by_epoch[int(epoch)].append(key)
    valid = 52
    assert len(by_epoch) >= 2
    for epoch, keys in by_epoch.items():
        assert len(keys) == len(set(keys)), f"epoch {epoch}: a sample was used twice"
        if epoch < max(by_epoch):  # complete epochs
            assert valid - len(keys) < 2 * 3, f"epoch {epoch}: {valid - len(keys)} samples left out"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_with_flag_overrides_and_grad_accum(data, tmp_path, suffix):
    run = tmp_path / "run"
    if suffix == ".yaml":
        text = (f"shards: {data / 'shards'}\ntargets: {data / 'targets.zarr'}\nmodel: cae2_debug\nsteps: 9\n"
                "batch-size: 2\ngrad_accum: 2\nworkers: 0\nallow_random_teacher: true\nlog_every: 1\nlr: 0.001\n")
    else:
        text = (f'shards = "{data / "shards"}"\ntargets = "{data / "targets.zarr"}"\nmodel = "cae2_debug"\nsteps = 9\n'
                'batch_size = 2\ngrad_accum = 2\nworkers = 0\nallow_random_teacher = true\nlog_every = 1\nlr = 0.001\n')
    cfg = tmp_path / f"run{suffix}"
    cfg.write_text(text)
    res = cli("pretrain", "--config", str(cfg), "--out", str(run), "--steps", "3")  # the flag wins over the file
    assert res.returncode == 0, res.stderr[-2000:]
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["config"]["steps"] == 3 and resolved["config"]["grad_accum"] == 2
    assert resolved["derived"]["global_batch"] == 4 and resolved["derived"]["peak_lr"] == 0.001
    assert sorted(losses(run)) == [1, 2, 3]
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(text.replace("workers", "wrokers"))
    res = cli("pretrain", "--config", str(bad), "--out", str(tmp_path / "bad_run"))
    assert res.returncode == 2 and "unknown option(s) wrokers" in res.stderr


@pytest.mark.slow
def test_compile_runs_and_its_checkpoints_resume_without_compile(data, tmp_path):
    run = tmp_path / "run"
    res = cli(*pretrain_args(data, run, "--compile", "--compile-mode", "reduce-overhead", "--workers", "0", steps=2))
    assert res.returncode == 0, res.stderr[-2000:]  # on a CPU, torch.compile skips the CUDA graphs
    assert json.loads((run / "config.json").read_text())["config"]["compile_mode"] == "reduce-overhead"
    res = cli(*pretrain_args(data, run, "--resume", "latest", "--workers", "0", steps=3))
    assert res.returncode == 0 and "finished 3 steps" in res.stdout, res.stderr[-2000:]


def test_a_run_dir_in_use_is_refused_and_a_dead_holders_lock_taken_over(data, tmp_path):
    run = tmp_path / "run"
    lock = tmp_path / ".run.train.claim"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from dataclasses import asdict, replace

        from targets.claims import Holder

        lock.write_text(json.dumps(asdict(replace(Holder.me(), pid=sleeper.pid, pid_start=None))))
        res = cli(*pretrain_args(data, run, steps=2))
        assert res.returncode == 2 and f"pid {sleeper.pid}" in res.stderr and "is training in it" in res.stderr
        assert not run.exists()  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    res = cli(*pretrain_args(data, run, steps=2))  # the holder is gone: its lock is taken over
    assert res.returncode == 0, res.stderr[-2000:]
    assert not lock.exists()  # released at the end


def test_an_unreadable_latest_checkpoint_gives_way_to_the_previous_one(data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli(*pretrain_args(data, ref, "--save-every", "2", steps=8)).returncode == 0
    assert cli(*pretrain_args(data, run, "--save-every", "2", "--keep-last", "3", steps=6)).returncode == 0
    newest = run / "checkpoints" / "step_00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    res = cli(*pretrain_args(data, run, "--save-every", "2", "--resume", str(newest), steps=8))
    assert res.returncode == 2 and "is corrupt" in res.stderr and "Traceback" not in res.stderr  # named: refused
    (run / "checkpoints" / "step_00000004" / "optimizer.bin").unlink()  # the one before it is damaged too
    res = cli(*pretrain_args(data, run, "--save-every", "2", "--resume", "latest", steps=8))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from the previous complete checkpoint" in res.stderr and "step_00000002" in res.stderr
    assert losses(run) == losses(ref)  # steps 3-8 redone exactly


def test_a_non_finite_loss_stops_with_the_step_and_keys_and_keeps_the_checkpoints(data, tmp_path):
    import zarr
    from safetensors.torch import load_file

    store = tmp_path / "nan.zarr"
    shutil.copytree(data / "targets.zarr", store)
    run = tmp_path / "run"
    args = [a if a != str(data / "targets.zarr") else str(store) for a in pretrain_args(data, run, steps=3)]
    assert cli(*args, "--save-every", "1").returncode == 0  # three good steps and checkpoints
    unit = sorted((store / "units").iterdir())[0].name
    latents = zarr.open_array(str(store / "units" / unit / "latents"), mode="r+")
    latents[0] = np.nan  # then a corrupt row: NaN targets
    res = cli(*args, "--save-every", "1", "--resume", "latest", "--steps", "40", "--corrupt-targets", "off")
    assert res.returncode == 2 and "is not finite" in res.stderr and "Traceback" not in res.stderr
    found = re.search(r"step (\d+): the loss or a gradient is not finite .*samples of the step: (\S+)", res.stderr)
    assert found, res.stderr[-1500:]
    step = int(found.group(1))
    assert 4 <= step <= 40 and found.group(2).rstrip(",")
    ckpts = sorted((run / "checkpoints").iterdir())
    assert int(ckpts[-1].name.split("_")[1]) == step - 1  # every finished step, none after
    assert all(torch.isfinite(v).all() for v in load_file(str(ckpts[-1] / "model.safetensors")).values())


def test_a_flipped_byte_is_named_by_verify_and_stops_or_is_skipped_by_pretrain(data, tmp_path):
    store = tmp_path / "flipped.zarr"
    shutil.copytree(data / "targets.zarr", store)
    ts = TargetStore.open(store)
    unit = ts.unit_names()[0]
    key = ts.unit(unit).keys[0]
    shard_file = store / "units" / unit / "latents" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    view_bytes = ts.meta.num_tokens * ts.meta.latent_dim * 2
    for v in range(ts.meta.views_per_image):  # one byte in every view of row 0
        raw[v * view_bytes + 100] ^= 0x10
    shard_file.write_bytes(bytes(raw))
    from pipelines.extract.verify import verify_store
    report = verify_store(str(store), str(data / "shards"))
    assert not report.ok and any(f"unit {unit} row 0 (key {key}) view 0" in p for p in report.problems)
    args = [a if a != str(data / "targets.zarr") else str(store) for a in pretrain_args(data, tmp_path / "r", steps=13)]
    res = cli(*args)
    assert res.returncode == 2 and f"row 0 (key {key})" in res.stderr and "crc32c" in res.stderr
    assert "Traceback" not in res.stderr and "Original" not in res.stderr
    res = cli(*[a if a != str(tmp_path / "r") else str(tmp_path / "s") for a in args], "--corrupt-targets", "skip")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"WARNING: skipped: target store unit {unit} row 0 (key {key})" in res.stderr


def test_a_resume_proves_its_targets_and_records_changed_options_as_a_segment(data, tmp_path):
    run = tmp_path / "run"
    assert cli(*pretrain_args(data, run, "--save-every", "2", steps=4)).returncode == 0
    other = _extract(data / "shards", tmp_path / "k3.zarr", k=3)  # the same shards, another K
    args = [a if a != str(data / "targets.zarr") else str(other) for a in pretrain_args(data, run, "--resume",
                                                                                        "latest", steps=6)]
    res = cli(*args)
    assert res.returncode == 2 and "--targets is another target store (views_per_image: checkpoint 2, now 3)" \
        in res.stderr, res.stderr[-2000:]
    first = json.loads((run / "config.json").read_text())
    assert first["segments"] == [{"from_step": 0, "config": first["segments"][0]["config"]}]
    res = cli(*[a if a != "2e-3" else "1e-3" for a in pretrain_args(data, run, "--save-every", "2", "--resume",
                                                                    "latest", steps=6)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming at step 4 with changed options (steps: 4 -> 6, lr: 0.002 -> 0.001)" in res.stderr
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["lr"] == 1e-3 and record["segments"][0] == first["segments"][0]
    assert record["segments"][1] == {"from_step": 4, "changed": {"steps": {"was": 4, "now": 6},
                                                                 "lr": {"was": 2e-3, "now": 1e-3}}}


def test_a_changed_image_in_a_shard_of_the_same_size_is_named_by_verify_and_stops_or_is_skipped(data, tmp_path):
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    name = "shard-000001.tar"
    with tarfile.open(shards / name) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    key = member.name.split(".")[0]
    raw = bytearray((shards / name).read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0x01  # another image, the tar the same size
    (shards / name).write_bytes(bytes(raw))
    assert (shards / name).stat().st_size == (data / "shards" / name).stat().st_size
    res = cli("verify-targets", data / "targets.zarr", "--shards", shards)
    assert res.returncode != 0 and f"shard {name} key {key}: its image is not the one the targets were made from" \
        in res.stdout + res.stderr, res.stdout[-2000:]
    assert cli("verify-targets", data / "targets.zarr", "--shards", data / "shards").returncode == 0
    args = [a if a != str(data / "shards") else str(shards) for a in pretrain_args(data, tmp_path / "r", steps=13)]
    res = cli(*args)
    assert res.returncode == 2 and f"shard {name} key {key}: its image is not the one" in res.stderr
    assert "Traceback" not in res.stderr and len([x for x in res.stderr.splitlines() if "error:" in x]) == 1
    res = cli(*[a if a != str(tmp_path / "r") else str(tmp_path / "s") for a in args], "--corrupt-targets", "skip")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count(f"WARNING: skipped: shard {name} key {key}: its image is not the one") == 1
