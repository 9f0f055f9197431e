"""Every command on s3:// against a real S3-compatible server (SeaweedFS, started by the test set-up): the
same values as on local disk, kill -9 and restarts of the server survived, jobs sharing a store, a busy run
dir refused, faults as one line within the retry budget, and a warm cache that reads nothing twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr
from obstore.store import S3Store
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from zarr.storage import FsspecStore, ObjectStore

from bench.s3_server import BUCKET
from pipelines.run_dirs import RunDir
from pipelines.shards import make_shards
from targets.storage import Location
from targets.store import TargetStore
from tests.fixtures import (
    ACCELERATE_2CPU,
    ENV,
    ROOT,
    TINY_TEACHER,
    cli,
    colour_classes,
    hold_when,
    launch_errors,
    signal_job,
    write_bad_images,
    write_good_images,
)

pytestmark = pytest.mark.slow
ARRAYS = ("latents", "scales", "keys", "valid", "view_int", "view_float", "image_hw", "view_crc32c")


def _extract(shards, out, *extra):
    return ["extract-targets", "--shards", shards, "--out", out, "--teacher", TINY_TEACHER, "--pretrained", "none",
            "--views", "2", "--workers", "0", "--batch-size", "6", "--no-progress", *extra]


def _pretrain(shards, store, out, *extra):
    return ["pretrain", "--shards", shards, "--targets", store, "--model", "cae2_debug", "--out", out,
            "--batch-size", "4", "--workers", "0", "--allow-random-teacher", "--lr", "1e-3", "--log-every", "1",
            "--no-progress", *extra]


def _values(store: str | Path) -> dict[str, dict[str, np.ndarray]]:
    ts = TargetStore.open(str(store))
    return {n: {a: np.asarray(ts.unit(n).group[a][...]) for a in ARRAYS if a in ts.unit(n).group}
            for n in ts.unit_names()}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert np.array_equal(a[name][k], b[name][k]), (name, k)


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def _remote_losses(url: str) -> list:
    lines = (Location.of(url) / "metrics.jsonl").get().decode().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3_images")
    write_good_images(root / "images", 22, seed=3, sizes=((72, 96), (64, 64)))
    write_bad_images(root / "images")
    make_shards(root / "images", root / "shards", samples_per_shard=6)  # 5 shards, 30 samples, 28 valid
    assert cli(*_extract(root / "shards", root / "local.zarr")).returncode == 0
    return root


def test_every_command_on_a_bucket_gives_what_it_gives_on_disk(images, bucket, tmp_path):
    shards, store, run = f"{bucket}/shards", f"{bucket}/t.zarr", f"{bucket}/run"
    res = cli("make-shards", images / "images", shards, "--samples-per-shard", "6")
    assert res.returncode == 0 and "wrote 5 shard(s)" in res.stdout, res.stderr
    (Location.of(shards) / "shard-000003.tar").delete()  # an interrupted run: the rerun writes what is missing
    assert cli("make-shards", images / "images", shards, "--samples-per-shard", "6").returncode == 0
    assert [(Location.of(shards) / f"shard-00000{i}.tar").get() for i in range(5)] == \
        [(images / "shards" / f"shard-00000{i}.tar").read_bytes() for i in range(5)]  # byte for byte
    res = cli(*_extract(shards, store, "--workers", "1"))  # a loader worker: started with spawn
    assert res.returncode == 0, res.stderr[-3000:]
    _same(_values(images / "local.zarr"), _values(store))
    plain = zarr.open_group(_zarr_store(store), mode="r")  # plain zarr reads it, no cae2 code
    assert plain.attrs["cae2"]["views_per_image"] == 2 and plain["units/shard-000000.tar/latents"].shape[1] == 2
    res = cli("verify-targets", store, "--shards", shards, "--recompute", "4", "--pretrained", "none")
    assert res.returncode == 0 and "verify: OK" in res.stdout, res.stdout + res.stderr
    assert cli("convert-targets", store, f"{bucket}/t8.zarr").returncode == 0
    assert cli("convert-targets", images / "local.zarr", tmp_path / "t8.zarr").returncode == 0
    _same(_values(tmp_path / "t8.zarr"), _values(f"{bucket}/t8.zarr"))

    res = cli(*_pretrain(shards, store, run, "--steps", "6", "--save-every", "2", "--keep-last", "2"))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpts = sorted({m.name.split("/")[0] for m in (Location.of(run) / "checkpoints").list()})
    assert ckpts == ["step_00000004", "step_00000006"]  # retention deleted the oldest in the bucket
    res = cli(*_pretrain(shards, store, run, "--steps", "8", "--save-every", "2", "--keep-last", "2",
                         "--resume", "latest"))
    assert res.returncode == 0 and "resumed from" in res.stderr, res.stderr[-3000:]
    local = tmp_path / "run"  # the same two commands on local disk
    for steps, extra in (("6", ()), ("8", ("--resume", "latest"))):
        assert cli(*_pretrain(images / "shards", images / "local.zarr", local, "--steps", steps, "--save-every", "2",
                              *extra)).returncode == 0
    assert _remote_losses(run) == _losses(local)  # exactly the same run

    res = cli("export", run, "--out", tmp_path / "enc.safetensors")
    assert res.returncode == 0, res.stderr
    state = load_file(str(tmp_path / "enc.safetensors"))
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["timm_kwargs"])
    VisionTransformer(**meta).load_state_dict(state, strict=True)
    colour_classes(tmp_path / "labelled" / "train", 4, seed=1)
    colour_classes(tmp_path / "labelled" / "val", 2, seed=2)
    res = cli("evaluate", "knn", "--model", run, "--train", tmp_path / "labelled" / "train", "--val",
              tmp_path / "labelled" / "val", "--workers", "0", "--ks", "3", "--out", f"{bucket}/knn.json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((Location.of(bucket) / "knn.json").get())["results"]["3"]["top1"] >= 0


def _zarr_store(url: str):
    """zarr's own object-store adapter over an obstore client of the same bucket (plain zarr, no cae2 code)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = S3Store(bucket, prefix=prefix, endpoint=os.environ["AWS_ENDPOINT_URL"], allow_http=True)
    return ObjectStore(client, read_only=True)


def _complete_units(store: str) -> int:
    """Units whose zarr.json (uploaded last) is in the bucket."""
    return len([m for m in (Location.of(store) / "units").list() if m.name.count("/") == 1
                and m.name.endswith("/zarr.json")])


def _start(args, tmp_path: Path, name: str) -> subprocess.Popen:
    out = open(tmp_path / f"{name}.out", "w")  # noqa: SIM115 - the job's stdout and stderr, read after it ends
    log = open(tmp_path / f"{name}.err", "w")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *map(str, args)], stdout=out,
                            stderr=log, env={**ENV, **{k: os.environ[k] for k in os.environ if k.startswith(
                                ("AWS_", "CAE2_"))}}, cwd=ROOT, start_new_session=True)


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.05)


def _server_down_until_exit(server, proc: subprocess.Popen) -> float:
    """Stop the server, wait for the job to end, start the server again (same data) -> seconds the job took."""
    server.stop()
    stopped = time.time()
    try:
        proc.wait(timeout=120)
        return time.time() - stopped
    finally:
        server.start()


def test_kill_9_during_extraction_then_rerun_equals_undisturbed(images, bucket, tmp_path):
    store = f"{bucket}/t.zarr"
    proc = _start(_extract(images / "shards", store, "--batch-size", "2"), tmp_path, "killed")
    wanted = random.Random(5).randint(1, 3)
    assert hold_when(proc, lambda: _complete_units(store) >= wanted), (tmp_path / "killed.err").read_text()[-2000:]
    signal_job(proc, signal.SIGKILL)
    proc.wait()
    assert wanted <= _complete_units(store) < 5
    res = cli(*_extract(images / "shards", store))
    assert res.returncode == 0, res.stderr[-2000:]
    _same(_values(images / "local.zarr"), _values(store))


def test_three_jobs_share_a_bucket_store_and_equal_one(images, bucket, tmp_path):
    store = f"{bucket}/t.zarr"
    procs = [_start(_extract(images / "shards", store, "--batch-size", "2"), tmp_path, f"job{i}") for i in range(3)]
    for p in procs:
        p.wait(timeout=600)
    errors = [(tmp_path / f"job{i}.err").read_text() for i in range(3)]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for e in errors]
    assert not any("Traceback" in e for e in errors)
    ts = TargetStore.open(store)
    writers = {n: ts.marker(n)["writer"]["pid"] for n in ts.unit_names()}
    assert len(writers) == 5 and set(writers.values()) <= {p.pid for p in procs}
    assert not [m for m in (Location.of(store) / ".claims").list() if m.name.endswith(".claim")]  # all released
    _same(_values(images / "local.zarr"), _values(store))


def test_pretrain_on_a_bucket_survives_kill_9_and_refuses_a_second_job(images, bucket, tmp_path):
    shards, store = f"{bucket}/shards", f"{bucket}/t.zarr"
    assert cli("make-shards", images / "images", shards, "--samples-per-shard", "6").returncode == 0
    assert cli(*_extract(shards, store)).returncode == 0
    straight, run = f"{bucket}/straight", f"{bucket}/run"
    args = ("--steps", "16", "--save-every", "4", "--keep-last", "10")
    assert cli(*_pretrain(shards, store, straight, *args)).returncode == 0
    proc = _start(_pretrain(shards, store, run, *args), tmp_path, "killed")
    marker = Location.of(run) / "checkpoints" / "step_00000004" / "COMPLETE"
    _wait_for(lambda: marker.exists() or proc.poll() is not None)
    assert proc.poll() is None, (tmp_path / "killed.err").read_text()[-2000:]
    busy = cli(*_pretrain(shards, store, run, *args, "--resume", "latest"))  # the job still holds it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert busy.returncode == 2 and "is training in it" in busy.stderr, \
        busy.stderr[-1500:] + (tmp_path / "killed.err").read_text()[-1500:]
    res = cli(*_pretrain(shards, store, run, *args, "--resume", "latest"))
    assert res.returncode == 0 and "resumed from" in res.stderr, res.stderr[-2000:]
    assert _remote_losses(run) == _remote_losses(straight)


def test_faults_are_one_line_within_the_retry_budget(images, bucket, s3_server, monkeypatch):
    shards = f"{bucket}/shards"
    assert cli("make-shards", images / "images", shards, "--samples-per-shard", "6").returncode == 0
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    res = cli(*_extract(shards, f"{bucket}/a.zarr"))
    assert res.returncode == 2 and "credentials are refused" in res.stderr and shards in res.stderr, res.stderr
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.env["AWS_SECRET_ACCESS_KEY"])
    res = cli("verify-targets", "s3://no-such-bucket-cae2/t.zarr")
    assert res.returncode == 2 and "bucket does not exist" in res.stderr, res.stderr
    t0 = time.time()
    res = cli(*_extract(f"s3://{bucket.split('/')[2]}/nothing/", f"{bucket}/b.zarr", "--retry-seconds", "3",
                        "--storage-option", "endpoint=http://127.0.0.1:9"))
    assert res.returncode == 2 and "cannot be reached after 3 s" in res.stderr, res.stderr
    assert time.time() - t0 < 30
    store = f"{bucket}/t.zarr"
    assert cli(*_extract(shards, store)).returncode == 0
    block = Location.of(store) / "units" / "shard-000001.tar" / "latents" / "c" / "0" / "0" / "0" / "0"
    block.delete()  # objects deleted under the data's feet: a block of the store, then a shard
    res = cli(*_pretrain(shards, store, f"{bucket}/run", "--steps", "2"))
    assert res.returncode == 2 and "shard-000001.tar is damaged" in res.stderr and "latents/c/0/0/0/0 is missing" \
        in res.stderr, res.stderr[-1500:]
    assert cli(*_extract(shards, store)).returncode == 0  # the rerun redoes that unit
    (Location.of(shards) / "shard-000002.tar").delete()
    res = cli(*_pretrain(f"{shards}/shard-{{000000..000004}}.tar", store, f"{bucket}/run", "--steps", "2"))
    assert res.returncode == 2 and "shard-000002.tar does not exist" in res.stderr, res.stderr[-1500:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr


def test_the_server_killed_mid_extraction_then_restarted_loses_nothing_complete(images, bucket, s3_server,
                                                                                  tmp_path):
    store = f"{bucket}/t.zarr"
    proc = _start([*_extract(images / "shards", store, "--batch-size", "2"), "--retry-seconds", "4"], tmp_path,
                  "cut")
    _wait_for(lambda: _complete_units(store) >= 1 or proc.poll() is not None)
    took = _server_down_until_exit(s3_server, proc)
    err = (tmp_path / "cut.err").read_text()
    if proc.returncode != 0:  # the job stopped with one line, bounded by its retry budget (not one per request)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and "cannot be reached" in lines[0], err[-2000:]
        assert f"{bucket}/" in lines[0], lines[0]
        assert took < 4 + 8, f"the job took {took:.1f} s to stop with a retry budget of 4 s"
    res = cli(*_extract(images / "shards", store))
    assert res.returncode == 0, res.stderr[-2000:]
    _same(_values(images / "local.zarr"), _values(store))


def test_a_shard_deleted_under_a_running_extraction_is_one_line_and_the_rest_is_kept(images, bucket, tmp_path):
    shards, store = f"{bucket}/shards", f"{bucket}/t.zarr"
    assert cli("make-shards", images / "images", shards, "--samples-per-shard", "2").returncode == 0  # 15 units
    names = sorted(m.name for m in Location.of(shards).list() if m.name.endswith(".tar"))
    last = Location.of(shards) / names[-1]
    kept = last.get()
    proc = _start([*_extract(shards, store, "--batch-size", "2"), "--retry-seconds", "4"], tmp_path, "gone")
    _wait_for(lambda: _complete_units(store) >= 1 or proc.poll() is not None)
    last.delete()  # the job has listed it and not read it yet
    proc.wait(timeout=120)
    out, err = (tmp_path / "gone.out").read_text(), (tmp_path / "gone.err").read_text()
    failed = [line for line in out.splitlines() if line.startswith("FAILED:")]  # the summary: its unit failed
    assert proc.returncode == 1 and "Traceback" not in err, out[-1000:] + err[-1000:]
    assert failed == [f"FAILED: shard {last} does not exist (any more); pass the shards the store was made from"]
    assert _complete_units(store) == len(names) - 1  # every other unit is written and complete
    last.put(kept)  # the shard back: the rerun finishes the store, equal to one undisturbed run
    assert cli(*_extract(shards, store)).returncode == 0
    assert cli(*_extract(shards, f"{bucket}/straight.zarr")).returncode == 0
    _same(_values(f"{bucket}/straight.zarr"), _values(store))


def test_a_warm_epoch_reads_nothing_twice_from_the_bucket(images, bucket, tmp_path, monkeypatch):
    shards, store = f"{bucket}/shards", f"{bucket}/t.zarr"
    assert cli("make-shards", images / "images", shards, "--samples-per-shard", "6").returncode == 0
    assert cli(*_extract(shards, store)).returncode == 0
    monkeypatch.setenv("CAE2_CACHE_DIR", str(tmp_path / "cache"))
    first = cli("--verbose", *_pretrain(shards, store, f"{bucket}/a", "--steps", "7"))  # one epoch of 7 steps
    assert first.returncode == 0, first.stderr[-2000:]
    copied = [line for line in first.stderr.splitlines() if "into the local cache" in line]
    assert any("shard-000000.tar (" in line for line in copied) and any("/latents/" in line for line in copied)
    again = cli("--verbose", *_pretrain(shards, store, f"{bucket}/b", "--steps", "14"))  # two epochs, warm
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [line for line in again.stderr.splitlines() if "into the local cache" in line]


def test_a_staged_checkpoint_is_fetched_again_when_its_object_changed_at_the_same_size(bucket, tmp_path):
    """A staging folder left by another run at the same URL (same file sizes, other bytes) is not trusted."""
    run = RunDir(f"{bucket}/run")
    step = run.local / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"A" * 1000)
    (step / "COMPLETE").write_text("{}")
    run.push_checkpoint("step_00000002")
    assert RunDir(f"{bucket}/run").pull_checkpoint("step_00000002") == step  # unchanged: nothing fetched
    assert (step / "model.safetensors").read_bytes() == b"A" * 1000
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"B" * 1000)  # another run wrote the same checkpoint name, same size
    Location.of(f"{bucket}/run/checkpoints/step_00000002/model.safetensors").upload(other)
    RunDir(f"{bucket}/run").pull_checkpoint("step_00000002")
    assert (step / "model.safetensors").read_bytes() == b"B" * 1000


def test_labelled_shards_in_a_bucket_are_known_by_their_bytes(bucket, tmp_path):
    """An evaluation set in a bucket has no modification times to key a feature cache by: its identity follows
    the images' bytes, so a shard rewritten under the same name is never served stale features."""
    from pipelines.evaluate.data import load_labelled

    colour_classes(tmp_path / "a", 3, seed=1)
    colour_classes(tmp_path / "b", 3, seed=2)
    make_shards(tmp_path / "a", f"{bucket}/val", samples_per_shard=100)
    first, again = (load_labelled(f"{bucket}/val", "--val") for _ in range(2))
    assert first.identity == again.identity and len(first) == 9
    make_shards(tmp_path / "b", tmp_path / "b_shards", samples_per_shard=100)  # same names, labels, sizes differ
    Location.of(f"{bucket}/val/shard-000000.tar").upload(tmp_path / "b_shards" / "shard-000000.tar")
    changed = load_labelled(f"{bucket}/val", "--val")
    assert changed.labels.tolist() == first.labels.tolist() and changed.identity != first.identity


def test_a_two_rank_launch_and_a_plain_job_share_a_bucket_store(images, bucket, tmp_path):
    store = f"{bucket}/t.zarr"
    env = {**ENV, **{k: os.environ[k] for k in os.environ if k.startswith(("AWS_", "CAE2_"))}}
    launch = subprocess.Popen([*ACCELERATE_2CPU, "-m", "pipelines.cli", *map(str, _extract(images / "shards", store))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    plain = _start(_extract(images / "shards", store), tmp_path, "plain")
    _, err = launch.communicate(timeout=600)
    plain.wait(timeout=600)
    assert launch.returncode == 0, launch_errors(err)
    assert plain.returncode == 0, (tmp_path / "plain.err").read_text()[-2000:]
    writers = {n: m["writer"]["pid"] for n, m in _markers(store).items()}
    assert len(writers) == 5 and plain.pid in writers.values() or len(set(writers.values())) >= 2
    _same(_values(images / "local.zarr"), _values(store))


def _markers(store: str) -> dict[str, dict]:
    ts = TargetStore.open(store)
    return {n: m for n in ts.unit_names() if (m := ts.marker(n)) is not None}


def test_a_bucket_store_reads_through_s3fs_and_tensorstore(images, bucket):
    """Other readers of the same objects, no cae2 code: zarr over s3fs (FsspecStore) and tensorstore's zarr3."""
    store = f"{bucket}/t.zarr"
    assert cli(*_extract(images / "shards", store)).returncode == 0
    ours = _values(store)
    name, prefix = "shard-000002.tar", store.removeprefix("s3://").split("/", 1)[1]
    fs = FsspecStore.from_url(store, read_only=True, storage_options={
        "endpoint_url": os.environ["AWS_ENDPOINT_URL"], "key": os.environ["AWS_ACCESS_KEY_ID"],
        "secret": os.environ["AWS_SECRET_ACCESS_KEY"]})
    group = zarr.open_group(fs, mode="r")
    assert group.attrs["cae2"]["views_per_image"] == 2
    for array in ("latents", "view_int", "valid"):
        assert np.array_equal(group[f"units/{name}/{array}"][...], ours[name][array]), array
    spec = {"driver": "zarr3", "kvstore": {"driver": "s3", "bucket": BUCKET, "path": f"{prefix}/units/{name}/latents/",
                                           "endpoint": os.environ["AWS_ENDPOINT_URL"], "aws_region": "us-east-1",
                                           "aws_credentials": {"type": "environment"}}}
    assert np.array_equal(ts.open(spec, read=True).result().read().result(), ours[name]["latents"])


def test_sigterm_saves_to_the_bucket_and_the_resume_is_exact(images, bucket, tmp_path):
    shards, store, run = f"{bucket}/shards", f"{bucket}/t.zarr", f"{bucket}/run"
    assert cli("make-shards", images / "images", shards, "--samples-per-shard", "6").returncode == 0
    assert cli(*_extract(shards, store)).returncode == 0
    proc = _start(_pretrain(shards, store, run, "--steps", "400", "--save-every", "1000"), tmp_path, "term")
    staged = RunDir(run).local / "metrics.jsonl"  # what the job writes before it pushes it
    _wait_for(lambda: staged.exists() or proc.poll() is not None)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)  # a scheduler's preemption
    proc.wait(timeout=120)
    err = (tmp_path / "term.err").read_text()
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    (step,) = RunDir(run).checkpoint_names()  # saved to the bucket before the exit, its marker last
    n = int(step.removeprefix("step_"))
    assert 0 < n < 400
    local = tmp_path / "copy"  # the bucket's run dir as saved, copied to disk: the same checkpoint resumed locally
    for meta in Location.of(run).list():
        (Location.of(run) / meta.name).download(local / meta.name)
    res = cli(*_pretrain(shards, store, run, "--steps", str(n + 3), "--resume", "latest"))
    assert res.returncode == 0 and "resumed from" in res.stderr, res.stderr[-2000:]
    assert f"finished {n + 3} steps" in res.stdout, res.stdout[-2000:]
    assert cli(*_pretrain(shards, store, local, "--steps", str(n + 3), "--resume", "latest")).returncode == 0
    ours = _remote_losses(run)
    assert [s for s, _ in ours] == list(range(1, n + 4))  # no step lost or repeated across the preemption
    assert ours == _losses(local)  # the bucket's checkpoint resumes exactly as the same checkpoint on disk


def test_a_refused_marker_and_a_server_stopped_mid_upload_lose_no_complete_checkpoint(images, bucket, s3_server,
                                                                                       tmp_path):
    shards, store, run = f"{bucket}/shards", f"{bucket}/t.zarr", f"{bucket}/run"
    assert cli("make-shards", images / "images", shards, "--samples-per-shard", "6").returncode == 0
    assert cli(*_extract(shards, store)).returncode == 0
    args = ("--steps", "12", "--save-every", "2", "--keep-last", "10", "--retry-seconds", "4")
    assert cli(*_pretrain(shards, store, f"{bucket}/straight", *args)).returncode == 0
    marker = f"{run.split('/', 3)[3]}/checkpoints/step_00000004/COMPLETE"
    s3_server.deny(BUCKET, [marker])  # a 403 on one object: the fourth step's checkpoint marker
    try:
        res = cli(*_pretrain(shards, store, run, *args))
    finally:
        s3_server.deny(BUCKET, [])
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and "step_00000004/COMPLETE" in lines[0] and \
        "access" in lines[0].lower() and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert RunDir(run).checkpoint_names() == ["step_00000002"]  # step 4's files are there, its marker is not
    other = f"{bucket}/other"
    s3_server.deny(BUCKET, [f"{other.split('/', 3)[3]}/metrics.jsonl"])  # the metrics go up before a checkpoint
    try:
        res = cli(*_pretrain(shards, store, other, *args))
    finally:
        s3_server.deny(BUCKET, [])
    assert res.returncode == 2 and "metrics.jsonl" in res.stderr, res.stderr[-2000:]
    assert RunDir(other).checkpoint_names() == []  # so a complete checkpoint always has its records there

    proc = _start(_pretrain(shards, store, run, *args, "--resume", "latest"), tmp_path, "cut")
    saved = RunDir(run).local / "checkpoints" / "step_00000006" / "COMPLETE"  # saved here, its upload begins
    _wait_for(lambda: saved.exists() or proc.poll() is not None)
    took = _server_down_until_exit(s3_server, proc)
    assert took < 4 + 8, f"the job took {took:.1f} s to stop with a retry budget of 4 s"
    err = (tmp_path / "cut.err").read_text()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "cannot be reached" in lines[0], err[-2000:]
    # named by its URL (the checkpoint's upload, or the next read when the upload was through): never the staging
    assert f"{bucket}/" in lines[0] and str(RunDir(run).local) not in lines[0], lines[0]
    assert RunDir(run).checkpoint_names()[-1] in ("step_00000002", "step_00000004", "step_00000006")
    res = cli(*_pretrain(shards, store, run, *args, "--resume", "latest"))
    assert res.returncode == 0 and "resumed from" in res.stderr, res.stderr[-2000:]
    assert _remote_losses(run) == _remote_losses(f"{bucket}/straight")
