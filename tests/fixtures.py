"""Test fixtures built on the fly: image folders with good and bad files, shards, stores."""

from __future__ import annotations

import atexit
import functools
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines import cli as cae2_cli
from pipelines import logs
from pipelines.demo import synthetic_image

ROOT = Path(__file__).resolve().parent.parent
# The tests' own local cache (object-store copies, image checks), never the user's.
os.environ["CAE2_CACHE_DIR"] = tempfile.mkdtemp(prefix="cae2-test-cache-")
atexit.register(shutil.rmtree, os.environ["CAE2_CACHE_DIR"], True)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Two gloo CPU ranks. accelerate 1.15's `launch --cpu --num_processes 2` starts a single process (its simple
# launcher needs mpirun for more); `--multi_gpu` launches through torchrun, and cae2 picks gloo when no GPU is seen.
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Each test process (pytest-xdist worker) launches on a port of its own: two launches at once on torchrun's
# default port 29500 fail with EADDRINUSE.
ACCELERATE_2CPU = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port())]
TINY_TEACHER = "cae2-tiny-clip"  # bundled open_clip config (targets/configs), random init in tests


@dataclass
class Ran:
    """What a `cae2` command left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args: object) -> Ran:
    """`cae2 ARGS` run in this process through the CLI's own entry (`pipelines.cli.run`), as a fresh process
    would run it: one intra-op thread (the subprocesses get OMP_NUM_THREADS=1, so losses compare bit for
    bit), stdout and stderr captured, an escaping exception printed as a traceback with status 1. For every
    test whose subject is not the process itself (signals, kills, injected faults, launches, concurrency)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cae2_cli.run([str(a) for a in args])
            except Exception:  # noqa: BLE001 - what a process would print before dying with status 1
                traceback.print_exc()
                code = 1
    finally:
        torch.set_num_threads(threads)
        logs.setup(logging.INFO)  # the next command in this process starts as a new process would
    return Ran(code, out.getvalue(), err.getvalue())


def cli_process(*args: object, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cae2 ARGS` in a new process (`python -m pipelines.cli`), for tests whose subject is the process."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, cwd=ROOT)


def hold_when(proc: subprocess.Popen, condition, timeout: float = 300, slice_s: float = 0.02) -> bool:
    """Run a job (started with `start_new_session=True`) in slices of `slice_s`, held by SIGSTOP while
    `condition()` is checked, until it holds: True with the job held there (`signal_job` then acts at that
    point however slow the check or the machine is), False when the job ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGSTOP)
        if proc.poll() is not None:
            return False
        if condition():
            return True
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(slice_s)
    signal_job(proc, signal.SIGKILL)
    raise TimeoutError(f"the job did not reach the wanted point in {timeout:.0f} s")


def _processes() -> dict[int, tuple[int, bytes]]:
    """{pid: (parent pid, environment)} of every process that can be read."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with suppress(OSError, IndexError):
                parent = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                out[int(d)] = (parent, Path(f"/proc/{d}/environ").read_bytes())
    return out


def descendants(root: int) -> dict[int, bytes]:
    """{pid: environment} of every process below `root` (launched ranks run in sessions of their own)."""
    table, found, todo = _processes(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, env) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = env
                todo.append(pid)
    return found


def kill_rank_when(launcher: subprocess.Popen, rank: int, condition, timeout: float = 300) -> None:
    """Run a launch in 20 ms slices, every process under it held by SIGSTOP while `condition()` is checked;
    once it holds, SIGKILL the launched process of `rank` (its own, not its workers) and let the rest run on."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs = descendants(launcher.pid)
        for pid in procs:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        if launcher.poll() is not None:
            raise AssertionError("the launch ended before the wanted point")
        hit = condition()
        if hit:
            ranks = [p for p, env in procs.items() if f"\0RANK={rank}\0".encode() in b"\0" + env]
            top = [p for p in ranks if _processes().get(p, (0, b""))[0] not in ranks]
            os.kill(top[0], signal.SIGKILL)
        for pid in procs:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if hit:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the launch did not reach the wanted point in {timeout:.0f} s")


def signal_job(proc: subprocess.Popen, signum: int) -> None:
    """Send `signum` to a job's whole process group and let it run on (a held job handles it at once)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
        os.killpg(proc.pid, signal.SIGCONT)


def launch_errors(stderr: str, tail: int = 2000) -> str:
    """A failed multi-rank launch's error lines from every rank (the failing rank's cause is often far
    above the launcher's own traceback), then the tail of stderr."""
    hits = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    return "\n".join(hits[:40]) + "\n...\n" + stderr[-tail:]


def _jpeg(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode != img.mode:
        img = img.convert(mode)
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_good_images(folder: Path, n: int, seed: int = 0, sizes=((96, 128), (120, 90), (80, 80))) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        p = folder / f"img{i:04d}.jpg"
        p.write_bytes(_jpeg(synthetic_image(rng, h, w)))
        paths.append(p)
    return paths


def write_bad_images(folder: Path, seed: int = 1) -> dict[str, str]:
    """The awkward files real data sets have. -> {file name: 'ok' | 'skip'}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (data, expect) in _bad_images(seed).items():
        (folder / name).write_bytes(data)
        files[name] = expect
    return files


@functools.cache
def _bad_images(seed: int) -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, 'ok' | 'skip')}, made once per seed (the 2000 x 3000 JPEG takes a while)."""
    rng = np.random.default_rng(seed)
    files = {
        "cmyk.jpg": (_jpeg(synthetic_image(rng, 70, 90), "CMYK"), "ok"),
        "gray.jpg": (_jpeg(synthetic_image(rng, 90, 70)[..., 0]), "ok"),
    }
    png = io.BytesIO()
    Image.fromarray(synthetic_image(rng, 64, 64)).save(png, format="PNG")
    files["png_named.jpg"] = (png.getvalue(), "ok")
    files["one_pixel.jpg"] = (_jpeg(synthetic_image(rng, 1, 1)), "ok")
    files["huge.jpg"] = (_jpeg(synthetic_image(rng, 2000, 3000)), "ok")
    full = _jpeg(synthetic_image(rng, 200, 200))
    files["truncated.jpg"] = (full[: len(full) // 2], "skip")
    files["zero_bytes.jpg"] = (b"", "skip")
    files["it's \"quoted\" - name.jpg"] = (_jpeg(synthetic_image(rng, 50, 300)), "ok")
    return files


def colour_classes(root: Path, per_class: int, seed: int, shuffle: bool = False) -> None:
    """Noisy images whose class is their colour (or, shuffled, a random folder): ROOT/class_<c>/img_*.jpg."""
    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for c, colour in enumerate(colours):
        for i in range(per_class):
            folder = root / f"class_{rng.integers(3) if shuffle else c}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(40, 90, 2)
            img = (np.array(colour) + rng.normal(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"img_{c}_{i:03d}.jpg")


def colour_splits(root: Path, train: int, val: int, shuffled_train: int, shuffled_val: int) -> Path:
    """train/val colour classes per class count, and shuffled_train/shuffled_val with labels that mean nothing."""
    colour_classes(root / "train", train, seed=1)
    colour_classes(root / "val", val, seed=2)
    colour_classes(root / "shuffled_train", shuffled_train, seed=3, shuffle=True)
    colour_classes(root / "shuffled_val", shuffled_val, seed=4, shuffle=True)
    return root

