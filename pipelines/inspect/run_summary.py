"""`cae2 inspect RUN_DIR`: a training run at a glance, read without disturbing a job that trains in it: its
options (pretrain: config.json, with the segments of resumes that changed them; fine-tuning and the official
linear probe: the newest checkpoint's record of them), the newest complete checkpoint, the last metrics and
validation accuracy, whether a live job holds the run (its claim), and the loss, lr and accuracy curves as a
PNG (matplotlib)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cae2.errors import UserError, naming
from pipelines.checkpoint import STATE_FILE
from pipelines.run_dirs import RunDir
from targets.claims import claim_beside, holder_alive, read_claim
from targets.storage import StorageError

SUMMARY_OPTIONS = ("model", "shards", "targets", "steps", "epochs", "batch_size", "grad_accum", "lr", "seed",
                   "mixed_precision", "view_path")
EVALUATION_OPTIONS = ("model", "train", "val", "preset", "protocol", "epochs", "global_batch", "batch_size", "lr",
                      "blr", "seed", "mixed_precision")
PROBE_NAMES = {"train/loss": "loss", "train/lr": "lr", "val/top1": "val_top1", "val/top5": "val_top5"}
"""The official probe's metrics names, read as fine-tuning's and pretrain's."""
RUN_FILES = ("config.json", "metrics.jsonl", "result.json")


@dataclass
class RunSummary:
    run: str
    options: dict
    derived: dict
    store: dict
    segments: int
    checkpoints: list[str]
    newest_checkpoint: str | None
    last_metrics: dict | None
    steps_logged: int
    held_by: str | None
    """The live job training in the run (host, pid, job), or None."""
    stale_claim: str | None = None
    curves: str | None = None
    """The PNG of the loss and lr curves, when written."""
    kind: str = "pretrain"
    """pretrain, finetune or linear probe (official)."""
    accuracy: dict | None = None
    """Fine-tuning and the probe: the last and the best validation top-1 (%) and their epochs."""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [f"run {self.run} ({self.kind})", *self._what()]
        if self.segments > 1:
            lines.append(f"  resumes     {self.segments - 1} with changed options (config.json, segments)")
        lines.append(f"  checkpoint  {self.newest_checkpoint or 'none complete yet'}"
                     f"{f' (of {len(self.checkpoints)} kept)' if self.checkpoints else ''}")
        m = self.last_metrics
        if m:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
            lines.append(f"  last        {shown}")
        else:
            lines.append("  last        no metrics yet")
        if self.accuracy:
            a = self.accuracy
            lines.append(f"  accuracy    val top-1 {a['last']:.2f}% (epoch {a['last_epoch']}), best {a['best']:.2f}% "
                         f"(epoch {a['best_epoch']})")
        lines.append(f"  job         {self.held_by or 'none holds the run now'}"
                     f"{f'; a stale claim of {self.stale_claim}' if self.stale_claim else ''}")
        if self.curves:
            lines.append(f"  curves      {self.curves}")
        return "\n".join(lines)

    def _what(self) -> list[str]:
        """The model and data lines: pretrain's from config.json, an evaluation's from its options."""
        o, d, store = self.options, self.derived, self.store
        if self.kind != "pretrain":
            given = ", ".join(f"{k.replace('_', '-')} {o[k]}" for k in EVALUATION_OPTIONS[3:] if o.get(k) is not None)
            return [f"  model       {o.get('model')}: {given} on {d.get('processes', '?')} process(es)",
                    f"  data        train {o.get('train')}; val {o.get('val')}"]
        return [f"  model       {o.get('model')}: {d.get('total_steps', '?')} steps ({d.get('steps_per_epoch', '?')}"
                f"/epoch), global batch {d.get('global_batch', '?')} on {d.get('processes', '?')} process(es), "
                f"peak lr {d.get('peak_lr', '?')} ({d.get('lr_rule', '?')})",
                f"  data        shards {o.get('shards')}; targets {store.get('path')} "
                f"({store.get('teacher', {}).get('name')}, K {store.get('views_per_image')}, "
                f"{store.get('latent_format')})"]


def is_run_dir(path: str) -> bool:
    """A pretrain run (config.json), or a fine-tuning or official-probe run (metrics.jsonl or checkpoints, no
    config.json). A target store is told apart first (`is_store`)."""
    run = RunDir(path)

    def has(name: str) -> bool:
        return (run.location / name).exists() if run.remote else (run.local / name).is_file()

    return has("config.json") or has("metrics.jsonl") or run.holds_checkpoints()


def summarize_run(path: str, curves: Path | None = None) -> RunSummary:
    """Read a run dir (local, or in an object store: its files fetched into the staging folder)."""
    run = RunDir(path)
    run.pull(RUN_FILES)
    checkpoints = run.checkpoint_names()
    kind, options, derived, config = _what_runs(run, path, checkpoints)
    metrics = _metrics(run.local / "metrics.jsonl")
    holder, age = read_claim(claim_beside(run.location, "train"), dt.datetime.now(dt.UTC))  # no clock write
    alive = holder is not None and holder_alive(holder, age)
    summary = RunSummary(
        run=str(path), kind=kind, options=options, derived=derived, store=config.get("store", {}),
        segments=len(config.get("segments", [1])), checkpoints=checkpoints,
        newest_checkpoint=checkpoints[-1] if checkpoints else None,
        last_metrics=next((r for r in reversed(metrics) if "loss" in r), None), steps_logged=len(metrics),
        accuracy=_accuracy(metrics), held_by=f"{holder.describe()}, heartbeat {age:.0f} s ago" if alive and holder
        else None, stale_claim=holder.describe() if holder and not alive else None)
    if curves is not None and any("loss" in r for r in metrics):
        plot_curves(metrics, curves, str(path))
        summary.curves = str(curves)
    return summary


def _what_runs(run: RunDir, path: str, checkpoints: list[str]) -> tuple[str, dict, dict, dict]:
    """(kind, options, derived values, config.json) of a run: pretrain's from its config.json; fine-tuning's and
    the official probe's from the trainer state of their newest complete checkpoint (none yet: unknown)."""
    config_file = run.local / "config.json"
    if config_file.is_file():
        try:
            with naming(config_file):
                config = json.loads(config_file.read_text())
        except ValueError as e:
            raise UserError(f"run dir {path}: {config_file} cannot be read ({e}); is this a cae2 run dir?") from None
        return "pretrain", {k: config.get("config", {}).get(k) for k in SUMMARY_OPTIONS}, config.get("derived", {}), \
            config
    state: dict = {}
    if checkpoints:
        where = run.location / "checkpoints" / checkpoints[-1] / STATE_FILE
        try:
            state = json.loads(where.get() if run.remote else where.path.read_bytes())
        except (OSError, StorageError, ValueError):
            state = {}  # a checkpoint being pruned as this reads: the summary goes on without its options
    given = state.get("config", {})
    kind = state.get("kind") or ("linear probe (official)" if "protocol" in given else "finetune or linear probe")
    return kind, {k: given.get(k) for k in EVALUATION_OPTIONS}, {"processes": state.get("layout", {}).get(
        "processes", "?")}, {}


def _accuracy(metrics: list[dict]) -> dict | None:
    """The last and the best validation top-1 of the metrics records (None: no validation yet)."""
    records = [(r.get("epoch"), r["val_top1"]) for r in metrics if "val_top1" in r]
    if not records:
        return None
    best = max(records, key=lambda r: r[1])
    return {"last": records[-1][1], "last_epoch": records[-1][0], "best": best[1], "best_epoch": best[0]}


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append({PROBE_NAMES.get(k, k): v for k, v in json.loads(line).items()})
        except (ValueError, AttributeError):
            continue  # the line a running job is writing
    return records


def plot_curves(metrics: list[dict], out: Path, title: str) -> None:
    """Loss (with l_v and l_z), lr and the validation top-1 (where there is one) against the step, as a PNG."""
    import matplotlib  # deferred: matplotlib loads only for the one command that plots

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # deferred with matplotlib itself

    records = [r for r in metrics if "loss" in r]
    steps = [r["step"] for r in records]
    validated = [(r["step"], r["val_top1"]) for r in metrics if "val_top1" in r]
    fig, axes = plt.subplots(1, 3 if validated else 2, figsize=(15 if validated else 10, 3.6), constrained_layout=True)
    ax_loss, ax_lr = axes[0], axes[1]
    if validated:
        axes[2].plot(*zip(*validated, strict=True), marker="o", color="tab:green")
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("validation top-1 %")
        axes[2].grid(alpha=0.3)
    for key, label in (("loss", "loss"), ("loss_v", "l_v (visible)"), ("loss_z", "l_z (masked)")):
        if all(key in r for r in records):
            ax_loss.plot(steps, [r[key] for r in records], label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records], color="tab:purple")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
