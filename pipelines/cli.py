"""The `cae2` command line. Every stage is a subcommand; `cae2 --help` lists them."""

from __future__ import annotations

import dataclasses
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import cae2
from cae2.errors import UserError
from pipelines import options
from targets.views import ViewSettings

app = typer.Typer(
    name="cae2",
    help="CAE v2 distillation of CLIP into ViTs, with an offline CLIP target cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cae2 {cae2.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _process_state():
    """Accelerate's view of this process (gloo CPU ranks when no GPU is visible)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _jsonable(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def preset_record(name: str) -> dict:
    preset = cae2.get_preset(name)
    import torch

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


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print every field as JSON.")] = False,
) -> None:
    """List the model presets with their architecture, training defaults and parameter counts.

    Example: cae2 models --json
    """
    records = [preset_record(n) for n in cae2.list_presets()]
    if as_json:
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


@app.command("make-shards")
def make_shards_cmd(
    source: Annotated[Path, typer.Argument(help="Image folder (class sub-folders = labels) or a file of paths.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory for the .tar shards.")],
    samples_per_shard: Annotated[int, typer.Option(min=1, help="Images per shard.")] = 1000,
    prefix: Annotated[str, typer.Option(help="Shard file name prefix.")] = "shard",
) -> None:
    """Pack images into WebDataset tar shards (original bytes, labels, source paths).

    Example: cae2 make-shards /data/imagenet/train shards/ --samples-per-shard 1000
    """
    from pipelines.shards import make_shards

    paths = make_shards(source, out_dir, samples_per_shard, prefix)
    typer.echo(f"wrote {len(paths)} shard(s) to {out_dir}: {paths[0].name} .. {paths[-1].name}")


def _extract_targets(cfg) -> None:
    """Stage 1: cache the CLIP teacher's per-token latents for K views of every image.

    Example: accelerate launch -m pipelines.cli extract-targets --shards 'train-{000000..000127}.tar' --out targets.zarr
    """
    from dataclasses import replace

    from accelerate.utils import gather_object

    from pipelines.extract import format_summary, merge_stats, run_extract

    cfg = replace(cfg, teacher=replace(cfg.teacher, init_seed=cfg.seed))  # a random teacher is seeded by --seed
    if cfg.teacher.is_random:
        typer.echo("NOTE: --pretrained none: the teacher is RANDOMLY INITIALISED (tests and demos only); the store "
                   "records this and `cae2 pretrain` refuses it without --allow-random-teacher", err=True)
    stats = run_extract(cfg, log=lambda m: typer.echo(m, err=True))
    state = _process_state()
    total = merge_stats(gather_object([stats])) if state.num_processes > 1 else stats
    if state.is_main_process:
        typer.echo(format_summary(total, state.num_processes))
        typer.echo(f"store: {cfg.out}")
    _end_ranks(state)
    if total.units_failed:
        raise typer.Exit(1)


def _end_ranks(state) -> None:
    """Every rank reaches the end, then the process group goes (a gloo group left to the interpreter's
    exit can abort a rank that finished early: 'terminate called without an active exception')."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


def _extract_config():
    from pipelines.extract import ExtractConfig

    return ExtractConfig


EXTRACT_FLAGS = {"teacher.name": "--teacher", "teacher.pretrained": "--pretrained",
                 "teacher.quick_gelu": "--quick-gelu", "teacher.image_size": "--teacher-image-size",
                 "teacher.init_seed": None, "views_per_image": "--views", "allow_download": "--download"}
options.command(app, "extract-targets", _extract_config(), _extract_targets, names=EXTRACT_FLAGS)


@app.command("convert-targets")
def convert_targets_cmd(
    src: Annotated[str, typer.Argument(help="An fp16 target store (only read).")],
    dst: Annotated[str, typer.Argument(help="The new store; rerun to resume.")],
    latent_format: Annotated[str, typer.Option(help="int8: one float32 scale per token.")] = "int8",
    min_cosine: Annotated[float, typer.Option(help="Fail a unit whose token cosine to the source falls below "
                                                   "this.")] = 0.999,
) -> None:
    """Rewrite an fp16 target store as int8 latents with per-token scales (about half the size).

    Example: cae2 convert-targets /out/in1k-b16-k5.zarr /out/in1k-b16-k5-int8.zarr --latent-format int8
    """
    from pipelines.convert import convert_store

    stats = convert_store(src, dst, latent_format, min_cosine, log=lambda m: typer.echo(m, err=True))
    typer.echo(stats.summary())
    typer.echo(f"store: {dst}")
    if stats.units_failed:
        raise typer.Exit(1)


@app.command("verify-targets")
def verify_targets_cmd(
    store: Annotated[str, typer.Argument(help="Target store to check.")],
    shards: Annotated[str | None, typer.Option(help="Shards the store must cover (counts and keys).")] = None,
    recompute: Annotated[int, typer.Option(min=0, help="Recompute N random views with the teacher.")] = 0,
    pretrained: Annotated[str | None, typer.Option(help="Teacher weights file, if moved since extraction.")] = None,
) -> None:
    """Check a target store: complete units, counts, finite values, valid view parameters, fidelity.

    Example: cae2 verify-targets targets.zarr --shards 'train-{000000..000127}.tar' --recompute 64
    """
    from pipelines.verify import verify_store

    report = verify_store(store, shards, recompute, pretrained)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


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


def _pretrain(cfg) -> None:
    """Stage 2: pretrain a CAE v2 student on cached targets (plain or under `accelerate launch`).

    Example: accelerate launch -m pipelines.cli pretrain --shards shards/ --targets t.zarr --out runs/base
    """
    from pipelines.train import train

    result = train(cfg, log=lambda m: typer.echo(m, err=True))
    if _process_state().is_main_process:
        if result["status"] == "preempted":
            typer.echo(f"preempted at step {result['step']}: checkpoint saved; rerun with --resume latest")
        else:
            typer.echo(f"finished {result['step']} steps; run dir: {result['run_dir']}")


def _train_config():
    from pipelines.train import TrainConfig

    return TrainConfig


options.command(app, "pretrain", _train_config(), _pretrain, default_help=_preset_defaults)


evaluate_app = typer.Typer(help="Measure an encoder: k-NN and linear probes (docs/evaluation.md).",
                           no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def _evaluate_knn(cfg) -> None:
    """k-NN classification of frozen features (DINO's weighted voting), k = 10, 20, 100, 200.

    Example: cae2 evaluate knn --model runs/base --train /data/in1k/train --val /data/in1k/val --out knn.json
    """
    from pipelines.evaluate import run_knn

    run_knn(cfg, log=typer.echo)


def _evaluate_linear(cfg) -> None:
    """Linear probe: logistic regression on frozen features, or the paper's official protocol.

    Example: accelerate launch -m pipelines.cli evaluate linear --protocol official --model runs/base --train ...
    """
    from pipelines.evaluate import run_linear

    main = cfg.protocol != "official" or _process_state().is_main_process
    run_linear(cfg, log=typer.echo if main else lambda m: None)


def _evaluate_configs():
    from pipelines.evaluate import KnnConfig, LinearConfig

    return KnnConfig, LinearConfig


options.command(evaluate_app, "knn", _evaluate_configs()[0], _evaluate_knn)
options.command(evaluate_app, "linear", _evaluate_configs()[1], _evaluate_linear)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint dir, or a run dir (its newest checkpoint).")],
    out: Annotated[Path, typer.Option(help="Output .safetensors file.")] = Path("encoder.safetensors"),
) -> None:
    """Export the pretrained encoder (no head, no regressor) as a timm VisionTransformer state dict.

    Example: cae2 export runs/base --out vit_base_cae2.safetensors
    """
    from pipelines.export import export_encoder

    ckpt, call = export_encoder(checkpoint, out)
    typer.echo(f"exported the encoder of {ckpt} to {out}; load it with:\n{call}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for every output of the demo.")] = Path("demo"),
    steps: Annotated[int, typer.Option(min=1, help="Pretraining steps.")] = 60,
) -> None:
    """Run the whole pipeline on a small embedded default (random tiny teacher, offline, CPU minutes).

    Example: cae2 demo --out demo
    """
    from pipelines.demo import run_demo

    run_demo(out, steps, echo=typer.echo)


def main() -> None:
    """Console-script entry: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except UserError as e:
        if _state["debug"]:
            raise
        text = str(e)
        if "Original Traceback" in text:  # raised in a data-loader worker: its own line is the last one
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        typer.echo(f"error: {text}", err=True)
        sys.exit(2)
    except OSError as e:  # a full, read-only or vanished file system, reported where it happened
        if _state["debug"]:
            raise
        typer.echo(f"error: {e.strerror or e}: {e.filename or 'a file'}; fix the file system (free space, "
                   "permissions, mounts) and rerun: complete work is kept", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
