"""Peak memory (RSS of the process and its data-loader workers) of extract-targets and pretrain at two
data-set sizes: it must not grow with the data set.

    python -m bench.memory [--extract-sizes 4,16] [--pretrain-sizes 1,4]   (multiples of the 300-image sample)
"""

from __future__ import annotations

import argparse
import os
import shutil
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
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}")
    return meter.peak / 2**20, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--extract-sizes", default="4,16", help="Multiples of the 300-image sample for extract-targets "
                    "(its memory settles after ~20 s, so both runs are longer than that).")
    ap.add_argument("--pretrain-sizes", default="1,4", help="Multiples of the sample for pretrain.")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "pipelines.cli"]
    extract_sizes = [int(v) for v in args.extract_sizes.split(",")]
    pretrain_sizes = [int(v) for v in args.pretrain_sizes.split(",")]
    # the same number of steps at every size: one epoch of the largest set and into the next
    steps = 300 * max(pretrain_sizes) // args.batch_size + 8
    rows = []
    for repeat in sorted(set(extract_sizes) | set(pretrain_sizes)):
        work = Path(tempfile.mkdtemp(prefix=f"cae2-bench-mem{repeat}-"))
        shards = make_sample_shards(work, per_shard=100, repeat=repeat)
        n = 300 * repeat
        if repeat in extract_sizes:
            mib, secs = peak_rss([*cli, "extract-targets", "--shards", str(shards), "--out", str(work / "t.zarr"),
                                  "--teacher", "cae2-tiny-clip", "--pretrained", "none", "--views", "2",
                                  "--workers", "2"])
            rows.append(["extract-targets (tiny teacher, K=2, 2 workers)", n, mib, secs])
        if repeat in pretrain_sizes:
            store = fake_store(shards, work / "b16.zarr", k=2)
            mib, secs = peak_rss([*cli, "pretrain", "--shards", str(shards), "--targets", str(store), "--model",
                                  "cae2_vit_tiny", "--out", str(work / "run"), "--steps", str(steps), "--batch-size",
                                  str(args.batch_size), "--workers", "2", "--allow-random-teacher",
                                  "--save-every", "100000"])
            rows.append([f"pretrain (ViT-Tiny, B/16-shaped targets, {steps} steps, 2 workers)", n, mib, secs])
        shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: (r[0], r[1]))
    body = ("## Memory\n\nPeak PSS of the whole process tree (main process + data-loader workers), sampled every "
            "50 ms, with the 300-image ImageNet sample repeated to different data-set sizes. Every pretrain run "
            f"takes the same {steps} steps (one epoch of the largest set and into the next); at each epoch boundary "
            "the next epoch's workers start during the last step of the current one.\n\n"
            + table(["command", "images", "peak PSS (MiB)", "wall time (s)"], rows))
    publish("memory", body)


if __name__ == "__main__":
    main()
