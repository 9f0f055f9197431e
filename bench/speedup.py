"""What the cache buys: training samples/s with cached targets vs `--teacher-online` (same student, data,
batch), against the ratio predicted by FLOPs: (student train + teacher forward) / student train.

Beside it, the same ratio from the measured speeds of the student's training step and the teacher's
forward on in-memory synthetic batches (what this machine allows when both run at their own FLOP/s),
and the input-pipeline overhead: cached samples/s / in-memory student step samples/s.

    python -m bench.speedup [--images 64] [--repeat 1] [--steps 12] [--batch-size 16]

The students' settings: `--steps-only --step-table 256:eager,256:default,256:reduce-overhead,...` times
only the in-memory training step of each student at each batch and torch.compile mode (section
`student-steps`, the fastest setting per student marked), for `pretrain --batch-size --compile
--compile-mode`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import cae2
from bench._common import ROOT, make_sample_shards, publish, rate, synthetic_masks, table
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.pretrain.config import COMPILE_MODES
from pipelines.pretrain.step import make_optimizer
from targets.store import TargetStore
from targets.teacher import Teacher, TeacherSpec


def flops_per_sample(student: str, teacher_name: str) -> tuple[float, float]:
    """(student fwd+bwd FLOPs, teacher fwd FLOPs) per image, counted by torch's FlopCounterMode.

    Counted with the math attention kernel and without nn.MultiheadAttention's fused inference path:
    the counter does not see inside those fused CPU kernels (it would report 22.7 instead of 35.3
    GFLOPs for the ViT-B/16 tower).
    """
    teacher = Teacher(TeacherSpec(name=teacher_name, pretrained="none"))
    model = cae2.create_model(student, target_dim=teacher.dim)
    cfg = model.cfg
    mask = synthetic_masks(cfg, 2)
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    torch.backends.mha.set_fastpath_enabled(False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, mask).float().pow(2).mean().backward()
    student_flops = counter.get_total_flops() / 2
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        teacher(torch.zeros(2, 3, teacher.image_size, teacher.image_size, dtype=torch.uint8))
    torch.backends.mha.set_fastpath_enabled(True)
    return student_flops, counter.get_total_flops() / 2


def in_memory_rates(student: str, teacher_name: str, batch_size: int, steps: int,
                    mixed_precision: str, compile: str | None = None) -> tuple[float, float]:
    """(student training steps, teacher forwards) in samples/s on in-memory synthetic batches: the step
    of `cae2 pretrain` (same loss, optimizer, gradient clipping, precision, --compile with `compile` as
    --compile-mode; None: eager) without any data loading."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else contextlib.nullcontext
    preset = cae2.get_preset(student).train
    teacher = Teacher(TeacherSpec(name=teacher_name, pretrained="none"), device=device,
                      compile=bool(compile) and (teacher_name, batch_size, mixed_precision, bool(compile)) not in
                      _TEACHER_RATES)
    model = cae2.create_model(student, target_dim=teacher.dim).to(device).train()
    net = torch.compile(model, mode=compile) if compile else model
    cfg = model.cfg
    opt = make_optimizer(model, preset, preset.weight_decay, 1e-4)
    mask = synthetic_masks(cfg, batch_size).to(device)
    images = torch.randn(batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    targets = torch.randn(batch_size, teacher.num_tokens, teacher.dim, device=device).half()
    views = torch.randint(0, 256, (batch_size, 3, teacher.image_size, teacher.image_size), dtype=torch.uint8)
    n_visible = cfg.num_visible_tokens

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # as in pretrain's step
        with autocast():
            pred = net(images, mask)
            out = cae2.alignment_loss(pred, cae2.CAEv2.arrange_targets(targets, mask), n_visible, preset.loss,
                                      preset.loss_combine)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip_grad or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)

    key = (teacher_name, batch_size, mixed_precision, bool(compile))
    if key not in _TEACHER_RATES:  # the same for every student
        _TEACHER_RATES[key] = rate(lambda: teacher(views), steps, batch_size)
    return rate(step, steps, batch_size), _TEACHER_RATES[key]


_TEACHER_RATES: dict[tuple, float] = {}


def samples_per_s(run: Path, skip_first: int = 1) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = records[skip_first:] or records
    return sum(r["samples_per_s"] for r in steady) / len(steady)


def publish_speedup(args, n_samples: int, device: str, rows: list, ceilings: list, steps_table: list) -> None:
    body = ("## Speedup of cached targets over an online teacher\n\n"
            f"Teacher {args.teacher} (random weights; speed only), batch {args.batch_size} per step, "
            f"{args.steps} steps (first logging window dropped), {args.images} real ImageNet JPEGs"
            f"{f' x {args.repeat} (as {n_samples} samples)' if args.repeat > 1 else ''}, {device}, "
            f"mixed precision {args.mixed_precision}, {'--compile' if args.compile else 'not compiled'}, views on "
            f"the {args.view_path} view path. Both runs of a pair use the same data-loader workers and "
            "settings.\n\n"
            + table(["student", "loader workers", "student train GFLOPs/img", "teacher fwd GFLOPs/img",
                     "online samples/s", "cached samples/s", "measured speedup", "FLOPs-predicted",
                     "**measured / predicted** (goal >= 0.9)", "measured / in-memory ratio",
                     "cached / in-memory step (pipeline efficiency)"], rows)
            + "\n\nThe same student step and teacher forward on in-memory synthetic batches (no decoding, reading "
              "or data loader), same batch and precision:\n\n"
            + table(["student", "student step samples/s", "teacher fwd samples/s", "student GFLOP/s",
                     "teacher GFLOP/s", "in-memory ratio 1 + step/fwd", "in-memory / FLOPs-predicted"], ceilings))
    if steps_table:
        body += ("\n\nThe students' in-memory training step by batch and torch.compile mode (same precision):\n\n"
                 + table(STEP_COLUMNS, steps_table))
    publish("speedup", body)


STEP_COLUMNS = ["student", "batch", "compile mode", "samples/s", "TFLOP/s", "fastest"]


def compile_setting(text: str) -> str | None:
    """A --step-table setting: eager (or 0), or a torch.compile mode (1: default); None for eager."""
    mode = {"0": "eager", "1": "default"}.get(text, text)
    if mode != "eager" and mode not in COMPILE_MODES:
        raise SystemExit(f"--step-table: {text!r} is not eager, 0, 1 or one of {', '.join(COMPILE_MODES)}")
    return None if mode == "eager" else mode


def student_steps(args, student: str, s_flops: float, known: dict) -> list[list]:
    """The in-memory step of `student` at each --step-table batch:setting, the fastest marked; `known`
    holds rates already measured, by (batch, mode)."""
    rows = []
    for pair in filter(None, args.step_table.split(",")):
        batch, setting = pair.split(":")
        key = (int(batch), compile_setting(setting))
        if key not in known:
            known[key], _ = in_memory_rates(student, args.teacher, key[0], max(args.steps // 2, 3),
                                            args.mixed_precision, key[1])
        rows.append([student, key[0], key[1] or "eager", known[key], known[key] * s_flops / 1e12, ""])
    if rows:
        max(rows, key=lambda r: r[3])[5] = "yes"
    return rows


def pretrain_flags(mode: str) -> str:
    """The `cae2 pretrain` flags of a step-table setting."""
    return "" if mode == "eager" else " --compile" + ("" if mode == "default" else f" --compile-mode {mode}")


def publish_student_steps(args, device: str, rows: list) -> None:
    fastest = [r for r in rows if r[5]]
    body = ("## Students' training step by batch and compile mode\n\n"
            f"The step of `cae2 pretrain` (loss, fused AdamW, gradient clipping) on in-memory synthetic batches, "
            f"{device}, mixed precision {args.mixed_precision}, {max(args.steps // 2, 3)} timed steps after a "
            "warm-up; teacher targets "
            f"of {args.teacher}'s size.\n\n" + table(STEP_COLUMNS, rows)
            + "\n\nWhat to pass to `cae2 pretrain` (per process; a larger global batch comes from more processes or "
              "--grad-accum):\n\n"
            + "\n".join(f"- {r[0]}: `--batch-size {r[1]}{pretrain_flags(r[2])}`" for r in fastest))
    publish("student-steps", body)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1,
                    help="Use each image this many times (under other keys): a data set of images x repeat samples, "
                         "so that a fast device runs many steps per epoch.")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--students", default="cae2_vit_tiny,cae2_vit_small")
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--compile", action="store_true", help="Run pretrain and the in-memory step compiled.")
    ap.add_argument("--compile-mode", default="default", help="torch.compile's mode with --compile.")
    ap.add_argument("--view-path", default="auto")
    ap.add_argument("--step-table", default="",
                    help="Also time the in-memory step at these batch:setting pairs, a setting being eager (0) or a "
                         "torch.compile mode (1: default), e.g. '256:eager,256:default,512:reduce-overhead'.")
    ap.add_argument("--steps-only", action="store_true",
                    help="Time only the --step-table settings of each student (section student-steps).")
    ap.add_argument("--workers", default=None,
                    help="Comma-separated data-loader worker counts, one pair of runs each (default: 0,1 on CPU, "
                         "where a worker process competes with the training threads for the cores; 8 on a GPU).")
    return ap.parse_args()


def cached_and_online(args: argparse.Namespace, student: str, shards: Path, store: Path, work: Path,
                      workers: int, target_dim: int) -> dict[str, float]:
    """{cache | online: samples/s} of two `cae2 pretrain` processes of `student`, alike but for --teacher-online."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rates = {}
    for mode in ("cache", "online"):
        run = work / f"{student}-{mode}-w{workers}"
        cmd = [sys.executable, "-m", "pipelines.cli", "pretrain", "--shards", str(shards), "--targets",
               str(store), "--model", student, "--out", str(run), "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--workers", str(workers), "--log-every", "2", "--save-every", "100000",
               "--allow-random-teacher", "--mixed-precision", args.mixed_precision, "--target-dim",
               str(target_dim), "--view-path", args.view_path]
        if args.compile:
            cmd += ["--compile", "--compile-mode", args.compile_mode]
        if mode == "online":
            cmd.append("--teacher-online")
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        rates[mode] = samples_per_s(run)
    return rates


def main() -> None:
    args = parse()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps_only:
        rows = []
        for student in args.students.split(","):
            rows += student_steps(args, student, flops_per_sample(student, args.teacher)[0], {})
            publish_student_steps(args, device, rows)  # a cut-off run keeps its rows
        return
    work = Path(tempfile.mkdtemp(prefix="cae2-bench-speedup-"))
    n_samples = args.images * args.repeat
    shards = make_sample_shards(work, n=args.images, per_shard=max(n_samples // 32, 1), repeat=args.repeat)
    store = work / "targets.zarr"
    worker_counts = [int(w) for w in (args.workers or ("8" if device == "cuda" else "0,1")).split(",")]
    run_extract(ExtractConfig(shards=str(shards), out=str(store), views_per_image=1, workers=max(max(worker_counts), 1),
                              progress=False, teacher=TeacherSpec(name=args.teacher, pretrained="none")))
    target_dim = TargetStore.open(store).meta.latent_dim  # e.g. ViT-Large's preset head is 768-d (ViT-L/14)
    rows, ceilings, steps_table = [], [], []
    for student in args.students.split(","):
        s_flops, t_flops = flops_per_sample(student, args.teacher)
        predicted = (s_flops + t_flops) / s_flops
        mode = args.compile_mode if args.compile else None
        step_rate, teacher_rate = in_memory_rates(student, args.teacher, args.batch_size, max(args.steps // 2, 3),
                                                  args.mixed_precision, mode)
        steps_table += student_steps(args, student, s_flops, {(args.batch_size, mode): step_rate})
        measured_ceiling = 1 + step_rate / teacher_rate
        ceilings.append([student, step_rate, teacher_rate, step_rate * s_flops / 1e9, teacher_rate * t_flops / 1e9,
                         measured_ceiling, measured_ceiling / predicted])
        for workers in worker_counts:
            rates = cached_and_online(args, student, shards, store, work, workers, target_dim)
            measured = rates["cache"] / rates["online"]
            rows.append([student, workers, s_flops / 1e9, t_flops / 1e9, rates["online"], rates["cache"], measured,
                         predicted, measured / predicted, measured / measured_ceiling, rates["cache"] / step_rate])
        publish_speedup(args, n_samples, device, rows, ceilings, steps_table)  # a cut-off run keeps its rows


if __name__ == "__main__":
    main()
