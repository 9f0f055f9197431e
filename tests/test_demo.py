"""The README's first command: the whole pipeline on the embedded default."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_demo_runs_every_stage_and_says_the_teacher_is_random(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--out", str(tmp_path / "demo"), "--steps",
                          "20"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "RANDOMLY INITIALISED" in out and "verify: OK" in out
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in out
    demo = tmp_path / "demo"
    for path in ("shards/shard-000000.tar", "targets.zarr/zarr.json", "run/metrics.jsonl", "encoder.safetensors"):
        assert (demo / path).exists(), path
    again = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--out", str(demo)], capture_output=True,
                           text=True, env=env, cwd=ROOT)
    assert again.returncode == 2 and "is not empty" in again.stderr
