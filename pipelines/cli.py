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
from cae2.config import LossCombine, LossKind, MaskStrategy, TrainDefaults
from cae2.errors import UserError

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


def _teacher_spec(teacher: str, pretrained: str, quick_gelu: str, image_size: int | None, seed: int):
    from targets.teacher import TeacherSpec

    qg = {"auto": None, "on": True, "off": False}.get(quick_gelu)
    if quick_gelu not in ("auto", "on", "off"):
        raise UserError(f"--quick-gelu must be auto, on or off, not {quick_gelu!r}")
    return TeacherSpec(name=teacher, pretrained=pretrained, quick_gelu=qg, image_size=image_size, init_seed=seed)


@app.command("extract-targets")
def extract_targets_cmd(
    shards: Annotated[str, typer.Option(help="Shards: brace pattern, directory, glob, or a file listing URLs.")],
    out: Annotated[str, typer.Option(help="Target store (Zarr v3 directory); rerun to resume.")],
    teacher: Annotated[str, typer.Option(help="open_clip model name or model-config .json.")] = "ViT-B-16",
    pretrained: Annotated[str, typer.Option(help="Tag (openai), weights file, or 'none' (random; demos).")]
    = "openai",
    views: Annotated[int, typer.Option("--views", min=1, help="K: views cached per image.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the view parameters (and of a random teacher).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Views per teacher forward.")] = 256,
    workers: Annotated[int, typer.Option(min=0, help="Decode workers per process.")] = 4,
    precision: Annotated[str, typer.Option(help="auto (fp16 on GPU, fp32 on CPU), fp32, bf16, fp16 (autocast), or "
                                                "bf16-weights, fp16-weights (the weights cast).")] = "auto",
    compile_teacher: Annotated[bool, typer.Option(help="torch.compile the teacher's tower.")] = False,
    latent_format: Annotated[str, typer.Option(help="fp16, or int8 with one scale per token (half the size).")]
    = "fp16",
    min_cosine: Annotated[float, typer.Option(help="int8: fail a unit whose token cosine to the teacher's output "
                                                   "falls below this.")] = 0.999,
    color_jitter: Annotated[float, typer.Option(help="Brightness/contrast/saturation jitter strength.")]
    = TrainDefaults.color_jitter,
    crop_min: Annotated[float, typer.Option(help="Smallest RandomResizedCrop area fraction.")]
    = TrainDefaults.crop_scale[0],
    teacher_image_size: Annotated[int | None, typer.Option(help="Teacher input size (196 for ViT-L-14).")] = None,
    quick_gelu: Annotated[str, typer.Option(help="auto (on for OpenAI weights), on, off.")] = "auto",
    images_per_shard: Annotated[int, typer.Option(min=1, help="Images per zarr shard file.")] = 32,
    download: Annotated[bool, typer.Option(help="Allow downloading CLIP weights (else local cache only).")] = False,
    view_path: Annotated[str, typer.Option(help="Where views are cut: pillow (decode workers, the reference), "
                                                "device (the teacher's device, bit-identical), auto (device on "
                                                "a GPU).")] = "auto",
) -> None:
    """Stage 1: cache the CLIP teacher's per-token latents for K views of every image.

    Example: accelerate launch -m pipelines.cli extract-targets --shards 'train-{000000..000127}.tar' --out targets.zarr
    """
    from accelerate.utils import gather_object

    from pipelines.extract import ExtractConfig, format_summary, merge_stats, run_extract
    from targets.views import ViewSettings

    cfg = ExtractConfig(
        shards=shards, out=out, views_per_image=views, seed=seed, batch_size=batch_size, workers=workers,
        precision=precision, images_per_shard=images_per_shard, allow_download=download, view_path=view_path,
        compile_teacher=compile_teacher, latent_format=latent_format, min_cosine=min_cosine,
        teacher=_teacher_spec(teacher, pretrained, quick_gelu, teacher_image_size, seed),
        views=_view_settings(ViewSettings, color_jitter, crop_min),
    )
    if cfg.teacher.is_random:
        typer.echo("NOTE: --pretrained none: the teacher is RANDOMLY INITIALISED (tests and demos only); the store "
                   "records this and `cae2 pretrain` refuses it without --allow-random-teacher", err=True)
    stats = run_extract(cfg, log=lambda m: typer.echo(m, err=True))
    state = _process_state()
    total = merge_stats(gather_object([stats])) if state.num_processes > 1 else stats
    if state.is_main_process:
        typer.echo(format_summary(total, state.num_processes))
        typer.echo(f"store: {out}")
    if total.units_failed:
        raise typer.Exit(1)


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


def _view_settings(cls, color_jitter: float, crop_min: float):
    try:
        return cls.from_jitter(color_jitter, crop_scale=(crop_min, 1.0))
    except ValueError as e:
        raise UserError(f"--color-jitter/--crop-min: {e}") from None


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


def load_config_file(path: Path) -> dict:
    """Options from a YAML or TOML file; keys are option names (dashes or underscores)."""
    if not path.is_file():
        raise UserError(f"--config {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--config {path} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


@app.command()
def pretrain(
    shards: Annotated[str | None, typer.Option(help="Training shards (as for extract-targets).")] = None,
    targets: Annotated[str | None, typer.Option(help="Target store made by extract-targets.")] = None,
    model: Annotated[str | None, typer.Option(help="Preset name (see `cae2 models`).")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory (metrics, TensorBoard, checkpoints).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs (default: the preset's, 300).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-process micro-batch (default 64).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak lr (default: 1.5e-3 x global batch / 2048).")] = None,
    min_lr: Annotated[float | None, typer.Option(help="Final lr of the cosine schedule.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Warmup epochs (default 10).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Warmup steps (overrides --warmup-epochs).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    clip_grad: Annotated[float | None, typer.Option(help="Gradient clipping max norm.")] = None,
    drop_path: Annotated[float | None, typer.Option(help="Stochastic depth rate.")] = None,
    target_dim: Annotated[int | None, typer.Option(help="Head dim = teacher dim (default: the preset's).")] = None,
    mask_strategy: Annotated[MaskStrategy | None, typer.Option(help="Masking (ablation: random).")] = None,
    loss: Annotated[LossKind | None, typer.Option(help="Token distance.")] = None,
    loss_combine: Annotated[LossCombine | None, typer.Option(help="tokens (code), sum (paper), visible, masked.")]
    = None,
    seed: Annotated[int | None, typer.Option(help="Seed of init, data order, views and masks.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Steps between metrics records.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    keep_last: Annotated[int | None, typer.Option(help="Complete checkpoints to keep.")] = None,
    resume: Annotated[str | None, typer.Option(help="'latest' (newest complete checkpoint of --out) or a path.")]
    = None,
    teacher_online: Annotated[bool | None, typer.Option("--teacher-online", help="Run the teacher every step.")]
    = None,
    allow_random_teacher: Annotated[bool | None, typer.Option("--allow-random-teacher",
                                                              help="Accept a store made by a random teacher.")]
    = None,
    compile: Annotated[bool | None, typer.Option("--compile", help="torch.compile the student (and the online "
                                                                   "teacher).")] = None,
    view_path: Annotated[str | None, typer.Option(help="Where views are cut: pillow (loader workers), device "
                                                       "(the training device, bit-identical), auto (device on a "
                                                       "GPU; the default).")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-loader workers per process (default 4).")] = None,
    shuffle_buffer: Annotated[int | None, typer.Option(help="Samples in each worker's shuffle buffer.")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="no, fp16 or bf16 (default: accelerate config).")]
    = None,
    log_keys: Annotated[bool | None, typer.Option("--log-keys", help="Log every sample key per step.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/TOML file of options; flags override it.")] = None,
) -> None:
    """Stage 2: pretrain a CAE v2 student on cached targets (plain or under `accelerate launch`).

    Example: accelerate launch -m pipelines.cli pretrain --shards shards/ --targets t.zarr --out runs/base
    """
    flags = {k: v for k, v in locals().items() if k != "config" and v is not None}
    from pipelines.train import TrainConfig, train

    options = (load_config_file(config) if config else {}) | flags
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"--config {config}: unknown option(s) {', '.join(unknown)}")
    for required in ("shards", "targets"):
        if required not in options:
            raise UserError(f"--{required} is required (on the command line or in --config)")
    result = train(TrainConfig(**options), log=lambda m: typer.echo(m, err=True))
    if _process_state().is_main_process:
        if result["status"] == "preempted":
            typer.echo(f"preempted at step {result['step']}: checkpoint saved; rerun with --resume latest")
        else:
            typer.echo(f"finished {result['step']} steps; run dir: {result['run_dir']}")


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
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
