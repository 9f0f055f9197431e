"""The README's first command: the whole pipeline on the embedded default."""

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
