"""Peak memory (RSS of the process and its data-loader workers) of extract-targets and pretrain at two
data-set sizes: it must not grow with the data set.

    python -m bench.memory [--small 1] [--large 4]     (multiples of the 300-image sample)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, PeakRSS, fake_store, make_sample_shards, publish, table


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """-> (peak MiB, seconds) of a command's process tree."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    meter = PeakRSS(proc.pid)
    while proc.poll() is None:
        meter.sample()
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return meter.peak / 2**20, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small", type=int, default=1)
    ap.add_argument("--large", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    rows = []
    for repeat in (args.small, args.large):
        work = Path(tempfile.mkdtemp(prefix=f"cae2-bench-mem{repeat}-"))
        shards = make_sample_shards(work, per_shard=100, repeat=repeat)
        n = 300 * repeat
        cli = [sys.executable, "-m", "pipelines.cli"]
        mib, secs = peak_rss([*cli, "extract-targets", "--shards", str(shards), "--out", str(work / "t.zarr"),
                              "--teacher", "cae2-tiny-clip", "--pretrained", "none", "--views", "2", "--workers", "2"])
        rows.append(["extract-targets (tiny teacher, K=2, 2 workers)", n, mib, secs])
        store = fake_store(shards, work / "b16.zarr", k=2)
        mib, secs = peak_rss([*cli, "pretrain", "--shards", str(shards), "--targets", str(store), "--model",
                              "cae2_vit_tiny", "--out", str(work / "run"), "--steps", str(args.steps), "--batch-size",
                              "16", "--workers", "2", "--allow-random-teacher", "--save-every", "100000"])
        rows.append([f"pretrain (ViT-Tiny, B/16-shaped targets, {args.steps} steps, 2 workers)", n, mib, secs])
    rows.sort(key=lambda r: r[0])
    body = ("## Memory\n\nPeak PSS of the whole process tree (main process + data-loader workers), sampled every "
            "50 ms, for the 300-image ImageNet sample repeated to two data-set sizes.\n\n"
            + table(["command", "images", "peak PSS (MiB)", "wall time (s)"], rows))
    publish("memory", body)


if __name__ == "__main__":
    main()
