"""`cae2 inspect`: a store's status (also while jobs write it), the visual report (opened in a real browser),
a run's summary, and pretrain's TensorBoard pictures."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.inspect.report import write_report
from pipelines.inspect.run_summary import summarize_run
from pipelines.inspect.store_status import store_status
from pipelines.pretrain.snapshots import image_every
from pipelines.shards import make_shards
from targets.claims import Holder, claim_beside, try_claim
from targets.storage import REQUESTS
from targets.teacher import TeacherSpec, _model_name, teacher_for_store
from targets.views import ViewSettings
from tests.fixtures import TINY_TEACHER, cli, hold_when, signal_job, write_good_images

UNITS = [f"shard-{i:06d}.tar" for i in range(6)]


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def markers_on_disk(store: Path) -> dict[str, dict]:
    """The complete units' markers, read as plain JSON (not through cae2)."""
    out = {}
    for meta in (store / "units").glob("*/zarr.json"):
        marker = json.loads(meta.read_text()).get("attributes", {}).get("complete")
        if marker is not None:
            out[meta.parent.name] = marker
    return out


# --- the status -------------------------------------------------------------------------------------------------

def test_status_of_a_finished_store_is_read_without_writing(corpus):
    store = corpus / "targets.zarr"
    before = files_of(store)
    res = cli("inspect", store, "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    markers = markers_on_disk(store)
    assert status["units_complete"] == len(markers) == 6
    assert status["units_planned"] == 6 and status["units_not_started"] == 0  # the plan extract-targets recorded
    assert status["images"] == sum(m["num_valid"] for m in markers.values()) == 52
    assert status["views"] == 52 * 2
    assert status["bytes"] == sum(sum(v or 0 for v in m["files"].values()) for m in markers.values())
    assert sum(status["skipped"].values()) == 2 and all(status["skipped_examples"][r] for r in status["skipped"])
    assert status["claims"] == [] and status["units_abandoned"] == [] and status["units_damaged"] == {}
    assert status["teacher"] == TINY_TEACHER and status["views_per_image"] == 2 and status["latent_format"] == "fp16"
    assert files_of(store) == before  # nothing written, nothing claimed
    screen = cli("inspect", store).stdout
    assert "6 complete" in screen and "0 not started, of 6 planned" in screen and "skipped   2 images" in screen


def _make_claim(store: Path, unit: str, holder: Holder, age: float = 0.0) -> None:
    path = store / ".claims" / f"{unit}.claim"
    assert try_claim(path, holder)[0]
    if age:
        os.utime(path, (time.time() - age, time.time() - age))


def test_status_names_live_stale_abandoned_damaged_and_not_started_units(corpus, tmp_path):
    store = tmp_path / "t.zarr"
    shutil.copytree(corpus / "targets.zarr", store)
    _make_claim(store, "shard-000006.tar", Holder.me())  # this process: alive
    _make_claim(store, "shard-000001.tar", Holder("gone-host", 4242, None, "77", "2026-01-01T00:00:00+00:00"),
                age=1200)  # another host, no heartbeat for 20 min: stale
    meta = json.loads((store / "units" / "shard-000001.tar" / "zarr.json").read_text())
    del meta["attributes"]["complete"]  # a unit its writer never finished
    (store / "units" / "shard-000001.tar" / "zarr.json").write_text(json.dumps(meta))
    latents = store / "units" / "shard-000002.tar" / "latents"
    block = next(p for p in latents.rglob("*") if p.is_file() and "c" in p.parts)
    block.write_bytes(block.read_bytes()[:-10])  # cut short: damaged
    planned = [*UNITS, "shard-000006.tar", "shard-000007.tar"]
    status = store_status(str(store), planned)
    assert status.units_complete == 4
    assert [(c.unit, c.alive) for c in sorted(status.claims, key=lambda c: c.unit)] == \
        [("shard-000001.tar", False), ("shard-000006.tar", True)]
    assert status.units_abandoned == ["shard-000001.tar"]  # incomplete, and its claim's holder is gone
    assert list(status.units_damaged) == ["shard-000002.tar"]
    assert status.units_planned == 8 and status.units_not_started == 1  # shard-000007.tar
    screen = status.render()
    assert "STALE" in screen and "gone-host pid 4242 job 77" in screen and f"pid {os.getpid()}" in screen
    assert "1 damaged" in screen and "shard-000002.tar:" in screen and "1 incomplete and not held" in screen


def test_status_of_an_int8_store_gives_the_recorded_errors(corpus, tmp_path):
    res = cli("convert-targets", corpus / "targets.zarr", tmp_path / "i8.zarr", "--latent-format", "int8")
    assert res.returncode == 0, res.stderr
    status = store_status(str(tmp_path / "i8.zarr"))
    markers = markers_on_disk(tmp_path / "i8.zarr")
    q = status.int8
    assert q is not None and q["units"] == 6
    assert q["min_token_cosine"] == min(m["quantization"]["min_token_cosine"] for m in markers.values()) < 1.0
    assert sum(q["unit_min_histogram"]["counts"]) == 6 and q["worst"]["key"]
    assert "int8      min token cosine" in status.render()


def test_inspect_errors_name_the_option(corpus, tmp_path):
    res = cli("inspect", corpus / "targets.zarr", "--report", tmp_path / "r")
    assert res.returncode == 2 and "--report on a target store needs --shards" in res.stderr
    res = cli("inspect", corpus / "targets.zarr", "--shards", corpus / "shards", "--report",
              corpus / "targets.zarr" / "r")
    assert res.returncode == 2 and "inside the target store" in res.stderr
    res = cli("inspect", tmp_path / "nothing.zarr")
    assert res.returncode == 2 and "nothing.zarr is neither a target store" in res.stderr, res.stderr


# --- the report -------------------------------------------------------------------------------------------------

def test_report_shows_the_views_the_targets_were_made_from(corpus, tmp_path):
    report = write_report(str(corpus / "targets.zarr"), str(corpus / "shards"), tmp_path / "r", samples=6, seed=1)
    assert len(report.samples) == 6 and all(len(s.views) == 2 for s in report.samples)
    meta = report.store.meta
    teacher = teacher_for_store(meta.teacher, meta.input_size, "cpu")
    for s in report.samples:  # the view shown, put through the teacher again, gives the cached latents
        for v in s.views:
            fresh = teacher(v.view[None])[0, 1:]
            assert F.cosine_similarity(fresh, v.patches, dim=-1).min() > 0.9995
            assert v.pca is not None and v.pca.shape == (*meta.grid, 3) and v.pca.dtype == np.uint8
        assert len(s.neighbours) == 3 and all(j != report.samples.index(s) for j, _ in s.neighbours)
    page = report.html.read_text()
    assert page.count('src="data:image/png;base64,') == 6 * (1 + 2 * 2 + 3)
    assert TINY_TEACHER in page and "views per image (K)" in page
    sheet = Image.open(report.sheet)
    assert sheet.height > sheet.width > 0


def test_report_of_an_int8_store(corpus, tmp_path):
    assert cli("convert-targets", corpus / "targets.zarr", tmp_path / "i8.zarr", "--latent-format", "int8",
               ).returncode == 0
    fp16 = write_report(str(corpus / "targets.zarr"), str(corpus / "shards"), tmp_path / "a", samples=4)
    int8 = write_report(str(tmp_path / "i8.zarr"), str(corpus / "shards"), tmp_path / "b", samples=4)
    for a, b in zip(fp16.samples, int8.samples, strict=True):
        assert a.key == b.key
        for va, vb in zip(a.views, b.views, strict=True):
            assert torch.equal(va.view, vb.view)
            assert F.cosine_similarity(va.patches, vb.patches, dim=-1).min() > 0.99


def _symmetric_teacher(path: Path) -> Path:
    """The tiny CLIP made exactly equivariant to horizontal flips: mirror-symmetric patch kernels and position
    embeddings symmetric across the columns (attention and the MLPs act on each token's content only)."""
    torch.manual_seed(0)
    model = open_clip.create_model(_model_name(TINY_TEACHER))
    visual = model.visual
    with torch.no_grad():
        visual.conv1.weight.copy_((visual.conv1.weight + visual.conv1.weight.flip(-1)) / 2)
        gh, gw = visual.grid_size
        grid = visual.positional_embedding[1:].reshape(gh, gw, -1)
        visual.positional_embedding[1:] = ((grid + grid.flip(1)) / 2).reshape(gh * gw, -1)
    torch.save(model.state_dict(), path)
    return path


def test_the_map_of_a_flipped_view_is_the_mirrored_map(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(6):  # smooth, asymmetric images at the teacher's input size (a crop of the whole is no resize)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC).save(tmp_path / "images" / f"{i}.png")
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=6)
    views = ViewSettings(brightness=0, contrast=0, saturation=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    run_extract(ExtractConfig(shards=str(tmp_path / "shards"), out=str(tmp_path / "t.zarr"), views=views,
                              teacher=TeacherSpec(name=TINY_TEACHER, quick_gelu=False,
                                                  pretrained=str(_symmetric_teacher(tmp_path / "sym.pt"))),
                              views_per_image=6, workers=0, progress=False))
    report = write_report(str(tmp_path / "t.zarr"), str(tmp_path / "shards"), tmp_path / "r", samples=6)
    grid = report.store.meta.grid
    pairs = 0
    for s in report.samples:
        flipped = [v for v in s.views if v.params.flip]
        plain = [v for v in s.views if not v.params.flip]
        if not flipped or not plain:
            continue
        a = report.basis.project(plain[0].patches).reshape(*grid, 3)
        b = report.basis.project(flipped[0].patches).reshape(*grid, 3)
        assert (b - a.flip(1)).abs().max() < 5e-3  # fp16 storage of the latents
        assert (a - a.flip(1)).abs().max() > 0.05  # the map itself is not symmetric: the check can fail
        assert np.abs(flipped[0].pca.astype(int) - plain[0].pca[:, ::-1].astype(int)).max() <= 2
        pairs += 1
    assert pairs >= 4


def _chromium() -> str | None:
    """Debian's chromium, installed here when missing (root and apt-get); None where it cannot be."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        subprocess.run(install, capture_output=True, env=env)
    return shutil.which("chromium")


CHECK_IMAGES = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const result = JSON.stringify({n: images.length, broken});
  document.body.insertAdjacentHTML("beforeend", `<pre id="checked">${result}</pre>`);
});</script></body>"""


@pytest.mark.slow
def test_report_opens_in_a_real_browser_with_every_image(corpus, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed and cannot be installed here (needs root and apt-get)")
    res = cli("inspect", corpus / "targets.zarr", "--shards", corpus / "shards", "--report", tmp_path / "r",
              "--samples", "5")
    assert res.returncode == 0, res.stderr
    page = tmp_path / "r" / "report.html"
    checked = tmp_path / "r" / "checked.html"  # the page with a script that reports the images it loaded
    checked.write_text(page.read_text().replace("</body>", CHECK_IMAGES))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          checked.as_uri()], capture_output=True, text=True, timeout=120).stdout
    result = json.loads(dom.rsplit('<pre id="checked">', 1)[1].split("</pre>", 1)[0])  # the last: not the script's
    assert result == {"n": 5 * (1 + 2 * 2 + 3), "broken": []}


# --- while jobs write -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_status_while_two_jobs_write_the_store(tmp_path):
    write_good_images(tmp_path / "images", 120, seed=5)
    make_shards(tmp_path / "images", tmp_path / "shards", samples_per_shard=6)  # 20 units, ~5 s of work each job
    store = tmp_path / "t.zarr"
    args = [sys.executable, "-m", "pipelines.cli", "extract-targets", "--shards", str(tmp_path / "shards"), "--out",
            str(store), "--teacher", TINY_TEACHER, "--pretrained", "none", "--views", "8", "--workers", "0",
            "--no-progress", "--batch-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def start():
        return subprocess.Popen(args, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def claims():
        return sorted((store / ".claims").glob("*.claim")) if (store / ".claims").is_dir() else []

    def done():
        return markers_on_disk(store) if (store / "units").is_dir() else {}

    # The first job is held mid-unit once it has finished two; the second then runs until it holds a unit too:
    # two live jobs, each in the middle of a unit, however fast or slow this machine is.
    procs = [start()]
    try:
        assert hold_when(procs[0], lambda: len(done()) >= 2 and len(claims()) == 1)
        procs.append(start())
        assert hold_when(procs[1], lambda: len(claims()) == 2)
        seen = (claims(), done())
        before = files_of(store)
        res = subprocess.run([*args[:3], "inspect", str(store), "--json", "--shards", str(tmp_path / "shards")],
                             capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        held, complete = seen
        assert status["units_complete"] == len(complete)
        assert sorted(c["unit"] for c in status["claims"]) == sorted(c.name.removesuffix(".claim") for c in held)
        assert {c["pid"] for c in status["claims"]} == {p.pid for p in procs}
        assert all(c["alive"] and c["host"] == socket.gethostname() for c in status["claims"])
        assert status["units_not_started"] == 20 - len(complete) - 2
        assert status["units_per_minute"] > 0 and status["eta_s"] > 0
        assert files_of(store) == before  # read while they write: nothing written, claimed or taken over
    finally:
        for p in procs:
            signal_job(p, signal.SIGCONT)
    for p in procs:
        assert p.wait(timeout=600) == 0
    final = store_status(str(store))
    assert final.units_complete == 20 and final.claims == [] and final.eta_s == 0.0
    assert final.units_not_started == 0 and "; done" in final.render()


@pytest.mark.slow
def test_status_of_1282_units_takes_seconds(corpus, tmp_path):
    store = tmp_path / "big.zarr"
    shutil.copytree(corpus / "targets.zarr", store)
    unit = store / "units" / "shard-000000.tar"
    for i in range(6, 1282):
        shutil.copytree(unit, store / "units" / f"shard-{i:06d}.tar")
    t0 = time.perf_counter()
    status = store_status(str(store), [f"shard-{i:06d}.tar" for i in range(1282)])
    seconds = time.perf_counter() - t0
    assert status.units_complete == 1282 and status.units_not_started == 0
    assert seconds < 5, f"{seconds:.1f} s for 1,282 units"


@pytest.mark.slow
def test_status_of_a_store_in_a_bucket(corpus, bucket):
    res = cli("extract-targets", "--shards", corpus / "shards", "--out", f"{bucket}/t.zarr", "--teacher",
              TINY_TEACHER, "--pretrained", "none", "--views", "1", "--workers", "0", "--no-progress")
    assert res.returncode == 0, res.stderr
    before = dict(REQUESTS)
    status = store_status(f"{bucket}/t.zarr")
    assert REQUESTS["put"] == before.get("put", 0) and REQUESTS["delete"] == before.get("delete", 0)  # read-only
    assert status.units_complete == 6 and status.units_planned == 6 and status.images == 52
    assert status.units_per_minute is not None and status.eta_s == 0.0
    res = cli("inspect", f"{bucket}/t.zarr")
    assert res.returncode == 0 and "6 complete" in res.stdout, res.stdout + res.stderr
    run = f"{bucket}/run"  # a run in the bucket reads as a run, not as a store
    res = cli("pretrain", "--shards", corpus / "shards", "--targets", f"{bucket}/t.zarr", "--model", "cae2_debug",
              "--out", run, "--steps", "2", "--batch-size", "4", "--workers", "0", "--save-every", "1",
              "--allow-random-teacher", "--lr", "1e-3", "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(cli("inspect", run, "--json").stdout)
    assert summary["kind"] == "pretrain" and summary["newest_checkpoint"] == "step_00000002"
    assert summary["last_metrics"]["step"] == 2


# --- runs -------------------------------------------------------------------------------------------------------

def test_run_summary_with_curves_and_the_job_that_holds_it(tiny_run, tmp_path):
    res = cli("inspect", tiny_run, "--report", tmp_path / "r")
    assert res.returncode == 0, res.stderr
    assert "checkpoint  step_00000002" in res.stdout and "none holds the run now" in res.stdout
    curves = Image.open(tmp_path / "r" / "curves.png")
    assert curves.width > 500 and curves.height > 200
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert try_claim(claim_beside(run, "train"), Holder.me())[0]  # a job training in it
    summary = summarize_run(str(run))
    assert summary.held_by is not None and f"pid {os.getpid()}" in summary.held_by
    assert summary.last_metrics is not None and summary.last_metrics["step"] == 2
    data = json.loads(cli("inspect", run, "--json").stdout)
    assert data["newest_checkpoint"] == "step_00000002" and data["options"]["model"] == "cae2_debug"


def test_pretrain_writes_tensorboard_pictures(corpus, tmp_path):
    res = cli("pretrain", "--shards", corpus / "shards", "--targets", corpus / "targets.zarr", "--model", "cae2_debug",
              "--out", tmp_path / "run", "--steps", "2", "--batch-size", "4", "--workers", "0", "--image-every", "1",
              "--lr", "1e-3", "--allow-random-teacher", "--no-progress")
    assert res.returncode == 0, res.stderr
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert sorted(tags["images"]) == [f"samples/{i}" for i in range(4)]
    assert {"token_cosine/visible", "token_cosine/masked"} <= set(tags["histograms"])
    first = events.Images("samples/0")
    assert [e.step for e in first] == [1, 2] and first[0].width > 3 * first[0].height
    assert image_every(None, 100) == 0 and image_every(None, 10_000) == 1000 and image_every(7, 100) == 7
