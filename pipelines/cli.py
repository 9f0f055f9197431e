"""The `cae2` command line. Every subcommand is generated from its config dataclass (`pipelines.options`)
and calls the function of its stage; `cae2 --help` lists them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import typer
from accelerate.utils import gather_object

import cae2
from cae2.errors import Stopped, Terminated, UserError
from cae2.fields import Switch
from pipelines import logs, options
from pipelines.demo import DemoConfig, run_demo
from pipelines.evaluate.commands import run_knn, run_linear
from pipelines.evaluate.config import KnnConfig, LinearConfig
from pipelines.evaluate.finetune import run_finetune
from pipelines.evaluate.finetune_config import FinetuneConfig
from pipelines.evaluate.monitor import KnnMonitor
from pipelines.extract.config import ExtractConfig
from pipelines.extract.convert import ConvertConfig, ConvertStats, convert_store
from pipelines.extract.run import ExtractStats, run_extract
from pipelines.extract.verify import VerifyConfig, verify_store
from pipelines.inspect.config import InspectConfig
from pipelines.inspect.report import write_report
from pipelines.inspect.run_summary import is_run_dir, summarize_run
from pipelines.inspect.store_status import is_store, store_status
from pipelines.launch import launch
from pipelines.outputs import check_output
from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.export import ExportConfig, export_encoder
from pipelines.pretrain.loop import train
from pipelines.run_dirs import shown
from pipelines.runs import end_ranks, peer_lost, process_state
from pipelines.shards import MakeShardsConfig, expand_shards, make_shards, shard_name
from targets.views import ViewSettings

logger = logging.getLogger(__name__)
app = typer.Typer(
    name="cae2",
    help="CAE v2 distillation of CLIP into ViTs, with an offline CLIP target cache.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False, "interruption_told": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cae2 {cae2.__version__}")
        raise typer.Exit()


def _help_without_a_command(ctx: typer.Context) -> None:
    """`cae2` or `cae2 evaluate` alone: the help (status 0)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Say only warnings and errors (CAE2_LOG_LEVEL=WARNING).")]
    = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Say debug messages too (CAE2_LOG_LEVEL=DEBUG).")]
    = False,
) -> None:
    _state["debug"] = debug
    if quiet and verbose:
        raise UserError("--quiet and --verbose ask for opposite things; pass one of them")
    logs.setup(logging.WARNING if quiet else logging.DEBUG if verbose else None)
    _help_without_a_command(ctx)


# --- cae2 models --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ModelsConfig:
    """Every option of `cae2 models`."""

    as_json: Annotated[bool, Switch()] = False
    """Print every field as JSON."""


def _jsonable(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def preset_record(name: str) -> dict:
    preset = cae2.get_preset(name)
    with torch.device("meta"):  # shapes only: parameter counts without allocating weights
        model = cae2.create_model(name)
    cfg = preset.model
    return {
        "name": name,
        "description": preset.description,
        "model": {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        | {"grid_size": list(cfg.grid_size), "num_masked": cfg.num_masked, "mask_ratio": round(cfg.mask_ratio, 4)},
        "train": {f.name: _jsonable(getattr(preset.train, f.name)) for f in dataclasses.fields(preset.train)},
        "views": ViewSettings().to_dict(),  # the same for every preset
        "params": {
            "total": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "encoder": sum(p.numel() for p in model.encoder.parameters() if p.requires_grad),
        },
    }


def _models(cfg: ModelsConfig) -> None:
    """List the model presets with their architecture, training defaults and parameter counts.

    Example: cae2 models --json
    """
    records = [preset_record(n) for n in cae2.list_presets()]
    if cfg.as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    header = f"{'name':<16}{'dim':>6}{'depth':>6}{'heads':>6}{'reg d/w/h':>12}{'masked':>8}{'drop':>6}" \
             f"{'enc params':>12}{'total':>12}"
    typer.echo(header)
    for r in records:
        m = r["model"]
        reg = f"{m['regressor_depth']}/{m['regressor_dim']}/{m['regressor_heads']}"
        typer.echo(f"{r['name']:<16}{m['embed_dim']:>6}{m['depth']:>6}{m['num_heads']:>6}{reg:>12}"
                   f"{m['num_masked']:>5}/{m['grid_size'][0] * m['grid_size'][1]:<3}{m['drop_path']:>5}"
                   f"{r['params']['encoder'] / 1e6:>11.1f}M{r['params']['total'] / 1e6:>11.1f}M")


options.command(app, "models", ModelsConfig, _models, names={"as_json": "--json"}, config_file=False)


# --- stage 1 ----------------------------------------------------------------------------------------

def _make_shards(cfg: MakeShardsConfig) -> None:
    """Pack images into WebDataset tar shards (original bytes, labels, source paths).

    Example: cae2 make-shards /data/imagenet/train shards/ --samples-per-shard 1000
    """
    check_output("OUT_DIR", cfg.out_dir, makes="shard folder")
    urls = make_shards(cfg.source, cfg.out_dir, cfg.samples_per_shard, cfg.prefix)
    typer.echo(f"wrote {len(urls)} shard(s) to {cfg.out_dir}: {shard_name(urls[0])} .. {shard_name(urls[-1])}")


options.command(app, "make-shards", MakeShardsConfig, _make_shards, config_file=False)


def _extract_targets(cfg: ExtractConfig) -> None:
    """Stage 1: cache the CLIP teacher's per-token latents for K views of every image.

    Example: accelerate launch -m pipelines.cli extract-targets --shards 'train-{000000..000127}.tar' --out targets.zarr
    """
    cfg = replace(cfg, teacher=replace(cfg.teacher, init_seed=cfg.seed))  # a random teacher is seeded by --seed
    if cfg.teacher.is_random:
        logger.warning("--pretrained none: the teacher is RANDOMLY INITIALISED (tests and demos only); the store "
                       "records this and `cae2 pretrain` refuses it without --allow-random-teacher")
    stats = run_extract(cfg)
    state = process_state()
    total = ExtractStats.merged(gather_object([stats])) if state.num_processes > 1 else stats
    if state.is_main_process:
        typer.echo(total.summary(state.num_processes))
        typer.echo(f"store: {cfg.out}")
    end_ranks(state)
    if total.units_failed:
        raise typer.Exit(1)


EXTRACT_FLAGS = {"teacher.name": "--teacher", "teacher.pretrained": "--pretrained",
                 "teacher.quick_gelu": "--quick-gelu", "teacher.image_size": "--teacher-image-size",
                 "teacher.init_seed": None, "views_per_image": "--views", "allow_download": "--download"}
options.command(app, "extract-targets", ExtractConfig, _extract_targets, names=EXTRACT_FLAGS)


def _convert_targets(cfg: ConvertConfig) -> None:
    """Rewrite an fp16 target store as int8 latents with per-token scales (about half the size).

    Example: cae2 convert-targets /out/in1k-b16-k5.zarr /out/in1k-b16-k5-int8.zarr --latent-format int8
    """
    check_output("DST", cfg.dst, makes="target store", inputs={"SRC": cfg.src})
    stats = convert_store(cfg)
    state = process_state()
    total = ConvertStats.merged(gather_object([stats])) if state.num_processes > 1 else stats
    if state.is_main_process:
        typer.echo(total.summary())
        typer.echo(f"store: {cfg.dst}")
    end_ranks(state)
    if total.units_failed:
        raise typer.Exit(1)


options.command(app, "convert-targets", ConvertConfig, _convert_targets, config_file=False)


def _verify_targets(cfg: VerifyConfig) -> None:
    """Check a target store: complete units, counts, finite values, valid view parameters, fidelity.

    Example: cae2 verify-targets targets.zarr --shards 'train-{000000..000127}.tar' --recompute 64
    """
    report = verify_store(cfg.store, cfg.shards, cfg.recompute, cfg.pretrained)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


options.command(app, "verify-targets", VerifyConfig, _verify_targets, config_file=False)


def _inspect(cfg: InspectConfig) -> None:
    """Show a target store's status (units, jobs, rate, ETA, skips) or a run's summary; --report draws pictures.

    Example: cae2 inspect targets.zarr --shards 'train-{000000..001281}.tar' --report report/ --samples 16
    """
    if cfg.report is not None:
        check_output("--report", cfg.report, inputs={"TARGET": cfg.target})
    if not is_store(cfg.target):
        if not is_run_dir(cfg.target):
            raise UserError(f"{cfg.target} is neither a target store (no zarr.json) nor a run dir (no config.json, "
                            "metrics.jsonl or checkpoints): pass a store extract-targets wrote, or the --out of a run")
        summary = summarize_run(cfg.target, Path(cfg.report) / "curves.png" if cfg.report else None)
        typer.echo(json.dumps(summary.to_json(), indent=1) if cfg.as_json else summary.render())
        return
    if cfg.report is not None and cfg.shards is None:
        raise UserError("--report on a target store needs --shards: the report shows the shards' images")
    planned = [s.name for s in expand_shards(cfg.shards)] if cfg.shards else None
    status = store_status(cfg.target, planned, cfg.window * 60)
    typer.echo(json.dumps(status.to_json(), indent=1) if cfg.as_json else status.render())
    if cfg.report is not None and cfg.shards is not None:
        report = write_report(cfg.target, cfg.shards, cfg.report, cfg.samples, cfg.seed, status)
        views = sum(len(s.views) for s in report.samples)
        typer.echo(f"report: {report.html} ({len(report.samples)} images, {views} views); contact sheet: "
                   f"{report.sheet}", err=cfg.as_json)


options.command(app, "inspect", InspectConfig, _inspect, names={"as_json": "--json"}, config_file=False)


# --- stage 2 ----------------------------------------------------------------------------------------

_PRESET_FIELDS = {"epochs": "train", "min_lr": "train", "warmup_epochs": "train", "weight_decay": "train",
                  "clip_grad": "train", "loss": "train", "loss_combine": "train", "drop_path": "model",
                  "target_dim": "model", "mask_strategy": "model"}


def _preset_defaults(opt) -> str | None:
    """What a None option of `pretrain` becomes, for every preset (help text)."""
    part = _PRESET_FIELDS.get(opt.path[0])
    if part is None:
        return None
    values: dict[str, list[str]] = {}
    for name in cae2.list_presets():
        value = _jsonable(getattr(getattr(cae2.get_preset(name), part), opt.path[0]))
        values.setdefault(str(value), []).append(name.removeprefix("cae2_"))
    if len(values) == 1:
        return f"Default: the preset's, {next(iter(values))} for every preset."
    return "Default: the preset's: " + "; ".join(f"{v} ({', '.join(n)})" for v, n in values.items()) + "."


def _pretrain(cfg: TrainConfig) -> None:
    """Stage 2: pretrain a CAE v2 student on cached targets (plain or under `accelerate launch`).

    Example: accelerate launch -m pipelines.cli pretrain --shards shards/ --targets t.zarr --out runs/base
    """
    evaluator = KnnMonitor(cfg.eval_data) if cfg.eval_every and cfg.eval_data else None
    loop = train(cfg, evaluator=evaluator)
    if loop.status == "finished" and process_state().is_main_process:
        typer.echo(loop.status_line())
    _end_of_run(loop.status, loop.status_line())


options.command(app, "pretrain", TrainConfig, _pretrain, default_help=_preset_defaults)


def _export(cfg: ExportConfig) -> None:
    """Export the pretrained encoder (no head, no regressor) as a timm VisionTransformer state dict.

    Example: cae2 export runs/base --out vit_base_cae2.safetensors
    """
    check_output("--out", cfg.out, inputs={"CHECKPOINT": cfg.checkpoint})
    ckpt, call = export_encoder(cfg.checkpoint, cfg.out)
    typer.echo(f"exported the encoder of {shown(ckpt)} to {cfg.out}; load it with:\n{call}")


# --- evaluation -------------------------------------------------------------------------------------

evaluate_app = typer.Typer(help="Measure an encoder: k-NN, linear probes, fine-tuning (docs/evaluation.md).",
                           callback=_help_without_a_command, invoke_without_command=True)
app.add_typer(evaluate_app, name="evaluate")


def _evaluate_knn(cfg: KnnConfig) -> None:
    """k-NN classification of frozen features (DINO's weighted voting), k = 10, 20, 100, 200.

    Example: cae2 evaluate knn --model runs/base --train /data/in1k/train --val /data/in1k/val --out knn.json
    """
    check_output("--out", cfg.out, inputs=_evaluation_inputs(cfg))
    run_knn(cfg)


def _evaluate_linear(cfg: LinearConfig) -> None:
    """Linear probe: logistic regression on frozen features, or the paper's official protocol.

    Example: accelerate launch -m pipelines.cli evaluate linear --protocol official --model runs/base --train ...
    """
    check_output("--out", cfg.out, inputs=_evaluation_inputs(cfg))
    if cfg.protocol == "official" and cfg.run_dir:
        check_output("--run-dir", cfg.run_dir, makes="run dir", inputs=_evaluation_inputs(cfg))
    result = run_linear(cfg)
    _end_of_run(result.get("status", "finished"), result.get("status_line", ""))


def _evaluate_finetune(cfg: FinetuneConfig) -> None:
    """Fine-tune the encoder end to end with the paper's recipe (Table 9 per size), top-1 on --val.

    Example: cae2 launch --multi_gpu --num_processes 8 evaluate finetune --model runs/base --train ... --out ft/
    """
    check_output("--out", cfg.out, makes="run dir", inputs=_evaluation_inputs(cfg))
    result = run_finetune(cfg)
    _end_of_run(result["status"], result["status_line"])


def _evaluation_inputs(cfg: KnnConfig | LinearConfig | FinetuneConfig) -> dict[str, str | None]:
    model = None if cfg.model.startswith(("timm:", "clip:")) else cfg.model
    return {"--model": model, "--train": cfg.train, "--val": cfg.val}


def _end_of_run(status: str, line: str) -> None:
    """A stopped run says where it stopped (SIGTERM: status 0, the scheduler's preemption; Ctrl-C: 130)."""
    if status != "finished" and process_state().is_main_process:
        typer.echo(line)
    if status == "interrupted":
        _state["interruption_told"] = True
        raise typer.Exit(130)


options.command(evaluate_app, "knn", KnnConfig, _evaluate_knn)
options.command(evaluate_app, "linear", LinearConfig, _evaluate_linear)
options.command(evaluate_app, "finetune", FinetuneConfig, _evaluate_finetune)
options.command(app, "export", ExportConfig, _export, config_file=False)


@app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def _launch(ctx: typer.Context) -> None:
    """Run a command under `accelerate launch`: its options first, then the command and the command's
    options. A failure is one line per process and exit status 2.

    Example: cae2 launch --multi_gpu --num_processes 8 extract-targets --shards shards/ --out t.zarr
    """
    names = [c.name for c in app.registered_commands if c.name and c.name != "launch"] + ["evaluate"]
    if not ctx.args or ctx.args[0] in ("--help", "-h"):
        typer.echo(ctx.get_help())
        return
    launch(ctx.args, names)


def _demo(cfg: DemoConfig) -> None:
    """Run the whole pipeline on a small embedded default (random tiny teacher, offline, CPU minutes).

    Example: cae2 demo --out demo
    """
    run_demo(cfg)


options.command(app, "demo", DemoConfig, _demo, config_file=False)


def run(args: list[str] | None = None) -> int:
    """Run the `cae2` command line -> its exit status. Every error is one line on stderr (status 2): bad
    usage, a user error, an OS error; Ctrl-C says what is kept (status 130)."""
    _state.update(debug=False, interruption_told=False, ending=False)
    with _sigterm_stops():
        try:
            return _run(args)
        except Terminated:  # in the instant the command ended, before its outcome was being said
            _say(f"{_rank()}{_STOPPED}")
            return 143
        finally:
            _state["ending"] = True


_STOPPED = ("stopped by SIGTERM: complete work is kept (finished units, saved checkpoints); rerun the same command "
            "to go on")


def _run(args: list[str] | None) -> int:
    try:
        try:
            status = app(args=args, prog_name="cae2", standalone_mode=False)
            status = status if isinstance(status, int) else 0
        finally:  # the outcome is being said from here on: a SIGTERM now (a launcher stopping every rank once
            _state["ending"] = True  # one has failed) must not cut off the error line being written
    except Terminated:
        _say(f"{_rank()}{_STOPPED}")
        return 143
    except typer.TyperException as e:  # click's usage errors (typer bundles click)
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "cae2"
        return _error(f"{' '.join(e.format_message().split())} (see `{command} --help`)")
    except Stopped as e:
        _say(str(e))
        return e.status
    except UserError as e:
        if _state["debug"]:
            raise
        _release_frames(e)
        text = str(e)
        if "Original Traceback" in text:  # raised in a data-loader worker: its own line is the last one
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        return _error(text)
    except OSError as e:  # a full, read-only or vanished file system, reported where it happened
        if _state["debug"]:
            raise
        _release_frames(e)
        return _error(f"{e.strerror or e}: {e.filename or 'a file'}; fix the file system (free space, permissions, "
                      "mounts) and rerun: complete work is kept")
    except typer.Abort:
        status = 130
    except Exception as e:
        if _state["debug"] or not peer_lost(e):
            raise
        _release_frames(e)
        reason = re.sub(r"^\[[^\]]*\] ", "", " ".join(str(e).split())).split(". ")[0][:160]
        return _error(f"{_rank()}another process of this launch ended, so this one stops ({type(e).__name__}: "
                      f"{reason}); complete work is kept (finished units, saved checkpoints): rerun the same command")
    if status == 130 and not _state.get("interruption_told"):  # Ctrl-C: typer makes KeyboardInterrupt status 130
        _say("interrupted: complete work is kept (finished units, saved checkpoints); rerun the same command "
             "to go on")
    return status


@contextlib.contextmanager
def _sigterm_stops():
    """SIGTERM stops the command as Ctrl-C does, with one line (a launcher stops the other ranks with it)."""
    def handle(signum, frame):
        if not _state.get("ending"):  # once the outcome is being said, a SIGTERM changes nothing
            raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _rank() -> str:
    """"rank N: " in a launch of several processes, else nothing."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""


def _release_frames(error: BaseException) -> None:
    """Let go of what the failed command's frames held (data-loader iterators and their worker processes, open
    stores) now, not at some later garbage collection: its traceback is a reference cycle."""
    traceback.clear_frames(error.__traceback__)


def _error(text: str) -> int:
    _state["ending"] = True
    _say(f"error: {text}")
    return 2


def _say(line: str) -> None:
    """One line on stderr; retried briefly, so that the line survives a moment in which writes fail."""
    for attempt in range(20):
        try:
            print(line, file=sys.stderr, flush=True)
            return
        except OSError:
            time.sleep(0.1 * (attempt + 1))


def main() -> None:
    """Console-script entry."""
    # zarr's coroutines left pending by an error warn at exit; the error line has said what happened
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").addFilter(_said_already)
    threading.excepthook = _thread_failed
    try:
        status = run()
    except KeyboardInterrupt:  # between two commands' steps, outside typer's handling
        _say("interrupted: complete work is kept; rerun the same command to go on")
        status = 130
    _state["failed"] = status != 0
    sys.exit(status)


def _said_already(record: logging.LogRecord) -> bool:
    """Drop asyncio's reports of what an error or an interruption left behind; the one line has said what
    happened. zarr reads a chunk's pieces concurrently and raises the first OSError: asyncio logs the others
    when their futures are collected; and tasks a Ctrl-C cut short are reported at exit as destroyed."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and "exception was never retrieved" in str(record.msg):
        return False
    return not (_state.get("failed") and "Task was destroyed but it is pending" in str(record.msg))


def _thread_failed(args) -> None:
    """TensorBoard's writer thread hands a failed write back to the next call from the main thread, which
    reports it as the one error line; every other thread's failure is printed as usual."""
    if issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard"):
        return
    threading.__excepthook__(args)


if __name__ == "__main__":
    main()
