"""The README's first command: the whole pipeline on the embedded default, and what `cae2 inspect` and
TensorBoard show of it."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.fixtures import cli


def test_demo_runs_every_stage_and_says_the_teacher_is_random(tmp_path):
    res = cli("demo", "--out", tmp_path / "demo", "--steps", "20")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "RANDOMLY INITIALISED" in out and "verify: OK" in out
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in out
    demo = tmp_path / "demo"
    for path in ("shards/shard-000000.tar", "targets.zarr/zarr.json", "run/metrics.jsonl", "encoder.safetensors"):
        assert (demo / path).exists(), path
    again = cli("demo", "--out", demo)
    assert again.returncode == 2 and "is not empty" in again.stderr
    _inspect_the_demo(demo, tmp_path)


def _inspect_the_demo(demo, tmp_path):
    """The status screen, the report and the run's summary of the demo, and its TensorBoard pictures."""
    status = json.loads(cli("inspect", demo / "targets.zarr", "--json").stdout)
    assert status["units_complete"] == status["units_planned"] == 8 and status["units_not_started"] == 0
    res = cli("inspect", demo / "targets.zarr", "--shards", demo / "shards", "--report", tmp_path / "report",
              "--samples", "8")
    assert res.returncode == 0 and "8 complete" in res.stdout and "report: " in res.stdout, res.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 8 * (1 + 4 * 2 + 3)  # image, 4 views and their maps, 3 neighbours
    assert (tmp_path / "report" / "contact_sheet.png").stat().st_size > 10_000
    res = cli("inspect", demo / "run", "--report", tmp_path / "report")
    assert res.returncode == 0 and "checkpoint  step_00000020" in res.stdout, res.stderr
    assert (tmp_path / "report" / "curves.png").is_file()
    events = EventAccumulator(str(demo / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == [f"samples/{i}" for i in range(4)]
    assert [e.step for e in events.Images("samples/0")] == [6, 12, 18]
