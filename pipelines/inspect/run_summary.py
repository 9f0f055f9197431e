"""`cae2 inspect RUN_DIR`: a training run at a glance, read without disturbing a job that trains in it: its
options (config.json, with the segments of resumes that changed them), the newest complete checkpoint, the last
metrics, whether a live job holds the run (its claim), and the loss and lr curves as a PNG (matplotlib)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cae2.errors import UserError, naming
from pipelines.run_dirs import RunDir
from targets.claims import claim_beside, holder_alive, read_claim

SUMMARY_OPTIONS = ("model", "shards", "targets", "steps", "epochs", "batch_size", "grad_accum", "lr", "seed",
                   "mixed_precision", "view_path")


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
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        o, d = self.options, self.derived
        lines = [f"run {self.run}",
                 f"  model       {o.get('model')}: {d.get('total_steps', '?')} steps ({d.get('steps_per_epoch', '?')}"
                 f"/epoch), global batch {d.get('global_batch', '?')} on {d.get('processes', '?')} process(es), "
                 f"peak lr {d.get('peak_lr', '?')} ({d.get('lr_rule', '?')})",
                 f"  data        shards {o.get('shards')}; targets {self.store.get('path')} "
                 f"({self.store.get('teacher', {}).get('name')}, K {self.store.get('views_per_image')}, "
                 f"{self.store.get('latent_format')})"]
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
        lines.append(f"  job         {self.held_by or 'none holds the run now'}"
                     f"{f'; a stale claim of {self.stale_claim}' if self.stale_claim else ''}")
        if self.curves:
            lines.append(f"  curves      {self.curves}")
        return "\n".join(lines)


def is_run_dir(path: str) -> bool:
    run = RunDir(path)
    if run.remote:
        return (run.location / "config.json").exists()
    return (Path(path) / "config.json").is_file() and not (Path(path) / "zarr.json").exists()


def summarize_run(path: str, curves: Path | None = None) -> RunSummary:
    """Read a run dir (local, or in an object store: its files fetched into the staging folder)."""
    run = RunDir(path)
    run.pull()
    config_file = run.local / "config.json"
    try:
        with naming(config_file):
            config = json.loads(config_file.read_text())
    except ValueError as e:
        raise UserError(f"run dir {path}: {config_file} cannot be read ({e}); is this a cae2 run dir?") from None
    metrics = _metrics(run.local / "metrics.jsonl")
    checkpoints = run.checkpoint_names()
    holder, age = read_claim(claim_beside(run.location, "train"), dt.datetime.now(dt.UTC))  # no clock write
    alive = holder is not None and holder_alive(holder, age)
    summary = RunSummary(
        run=str(path), options={k: config.get("config", {}).get(k) for k in SUMMARY_OPTIONS},
        derived=config.get("derived", {}), store=config.get("store", {}), segments=len(config.get("segments", [1])),
        checkpoints=checkpoints, newest_checkpoint=checkpoints[-1] if checkpoints else None,
        last_metrics=next((r for r in reversed(metrics) if "loss" in r), None), steps_logged=len(metrics),
        held_by=f"{holder.describe()}, heartbeat {age:.0f} s ago" if alive and holder else None,
        stale_claim=holder.describe() if holder and not alive else None)
    if curves is not None and any("loss" in r for r in metrics):
        plot_curves(metrics, curves, str(path))
        summary.curves = str(curves)
    return summary


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # the line a running job is writing
    return records


def plot_curves(metrics: list[dict], out: Path, title: str) -> None:
    """Loss (with l_v and l_z) and lr against the step, as a PNG."""
    import matplotlib  # deferred: matplotlib loads only for the one command that plots

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # deferred with matplotlib itself

    records = [r for r in metrics if "loss" in r]
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
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
