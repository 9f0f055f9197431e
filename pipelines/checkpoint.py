"""Checkpoints that survive preemption, written part by part through Python files (a refused write names
its file and errno) with no change to any global:

    RUN_DIR/checkpoints/step_00001000/
        model.safetensors           the model's weights, unwrapped (no DDP or torch.compile prefixes)
        optimizer.bin               the optimizer's state
        <name>.bin                  every further stateful part (an EMA of the weights)
        scaler.pt                   the fp16 grad scaler, where there is one
        random_states_<rank>.pkl    every process's generators: Python, NumPy, torch, CUDA
        trainer_state.json          step, epoch, data position, what the run was (the loop's record)
        COMPLETE                    written last, by the main process, after every process has saved

A directory without COMPLETE never counts, and is removed. Retention keeps the newest `keep` complete
checkpoints and never deletes the newest complete one. Checkpoints written by Accelerate's save_state
(cae2 0.1, no "checkpoint_format" in trainer_state.json) are read by Accelerate's load_state.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from cae2.errors import UserError, naming
from pipelines.files import fsync_dir, save_torch, write_atomically, write_bytes
from pipelines.run_dirs import MARKER, RunDir, shown
from pipelines.runs import peer_lost
from targets.storage import Location, StorageError

STATE_FILE = "trainer_state.json"
FORMAT = 2
"""trainer_state.json's "checkpoint_format": 2, the parts above; none: Accelerate's save_state."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
logger = logging.getLogger(__name__)


class CorruptCheckpoint(UserError):
    """A complete checkpoint whose files cannot be read; `reason` says which and why."""

    def __init__(self, ckpt: Path, reason: str):
        super().__init__(f"checkpoint {ckpt} is corrupt ({reason}); pass --resume with an older checkpoint")
        self.ckpt, self.reason = ckpt, reason


class CheckpointMismatch(UserError):
    """A complete checkpoint whose weights do not fit the run's model strictly (replaced, or of another model):
    refused in one line, never passed over for an older one."""

    def __init__(self, ckpt: Path, reason: str):
        super().__init__(f"checkpoint {shown(ckpt)} does not fit this run's model ({reason}); its model.safetensors "
                         "was replaced or is of another model: restore it, or pass --resume with an older checkpoint")


def fit_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Load `weights` strictly, or raise CheckpointMismatch saying in one line what differs."""
    have, want = set(weights), set(model.state_dict())
    if have != want:
        missing, unexpected = sorted(want - have), sorted(have - want)
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""]
        raise CheckpointMismatch(ckpt, f"{len(have)} tensors for a model of {len(want)}: "
                                       f"{', '.join(p for p in parts if p)}")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # a shape differs
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointMismatch(ckpt, detail[:300]) from None


@dataclass
class CheckpointParts:
    """What a checkpoint holds besides the trainer state: the (prepared) model and optimizer and any further
    objects with state_dict()/load_state_dict(), each in a file named for its key."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a local run dir, oldest first."""
    return [run_dir / "checkpoints" / name for name in RunDir(run_dir).checkpoint_names()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """'latest' -> newest complete checkpoint of RUN_DIR (None: start fresh); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if path.is_dir() and not (path / MARKER).is_file() and complete_checkpoints(path):
        return latest_checkpoint(path)  # a run dir was given
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint directory")
    if not (path / MARKER).is_file():
        raise UserError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker); pass an older one "
                        "or --resume latest")
    return path


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(ckpt, f"{STATE_FILE}: {e}") from None


# --- the parts ----------------------------------------------------------------------------------------

def rng_states() -> dict:
    """This process's random generators as tensors, lists and numbers (loadable with weights_only=True)."""
    version, words, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=True)
    assert isinstance(numpy_state, tuple)  # the legacy form: (name, keys, pos, has_gauss, cached)
    name, keys, pos, has_gauss, cached = numpy_state
    out = {"python": [version, list(words), gauss], "torch": torch.get_rng_state(),
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    version, words, gauss = states["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_parts(accelerator: Accelerator, ckpt: Path, parts: CheckpointParts) -> None:
    """Every process: the main one writes the model, optimizer and further parts, each its generators."""
    state = accelerator.get_state_dict(parts.model)  # every rank: a collective where the model is sharded
    if accelerator.is_main_process:
        weights = {k: torch.as_tensor(v).detach().to("cpu").contiguous() for k, v in state.items()}
        write_bytes(ckpt / "model.safetensors", safetensors.torch.save(weights, metadata={"format": "pt"}))
        save_torch(parts.optimizer.state_dict(), ckpt / "optimizer.bin")
        for name, part in parts.extra.items():
            save_torch(part.state_dict(), ckpt / f"{name}.bin")
        if accelerator.scaler is not None:
            save_torch(accelerator.scaler.state_dict(), ckpt / "scaler.pt")
    save_torch(rng_states(), ckpt / f"random_states_{accelerator.process_index}.pkl")


def _load(path: Path) -> Any:
    with naming(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_parts(accelerator: Accelerator, ckpt: Path, parts: CheckpointParts) -> None:
    """Every process restores the parts and its own generators from `ckpt`."""
    with naming(ckpt / "model.safetensors"):
        weights = safetensors.torch.load((ckpt / "model.safetensors").read_bytes())
    for prefix in WRAPPER_PREFIXES:
        consume_prefix_in_state_dict_if_present(weights, prefix)
    fit_weights(accelerator.unwrap_model(parts.model), weights, ckpt)
    parts.optimizer.load_state_dict(_load(ckpt / "optimizer.bin"))
    for name, part in parts.extra.items():
        part.load_state_dict(_load(ckpt / f"{name}.bin"))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(_load(ckpt / "scaler.pt"))
    set_rng_states(_load(ckpt / f"random_states_{accelerator.process_index}.pkl"))


# --- a run's checkpoints ------------------------------------------------------------------------------

class Checkpointer:
    """A run's checkpoints: which one a run resumes from, when to save, saving with retention, loading. In an
    object store (`RunDir`) they are saved in the staging folder, then uploaded, the marker last; a resume
    fetches the one it starts from."""

    def __init__(self, run: RunDir | Path, save_every: int, keep_last: int):
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.run_dir, self.save_every, self.keep_last = self.run.local, save_every, keep_last

    def _resolve(self, resume: str | None) -> Path | None:
        if resume == "latest":
            names = self.run.checkpoint_names()
            return self.run.checkpoint(names[-1]) if names else None
        if resume and Location.of(resume).remote:
            where = Location.of(resume)
            inside = RunDir(where.parent.parent)
            if where.parent.name != "checkpoints" or where.name not in inside.checkpoint_names():
                raise UserError(f"--resume {resume}: not a complete checkpoint (RUN/checkpoints/step_N with its "
                                f"{MARKER} marker); pass one, or --resume latest")
            return inside.pull_checkpoint(where.name)
        return resolve_resume(resume, self.run_dir)

    def find(self, resume: str | None) -> tuple[Path | None, dict | None]:
        """(checkpoint, its trainer state) to resume from, or (None, None) for a fresh run; a fresh run
        into a directory that holds checkpoints is refused."""
        ckpt = self._resolve(resume)
        if ckpt is None and resume != "latest" and self.run.holds_checkpoints():
            raise UserError(f"--out {self.run} already holds checkpoints; pass --resume latest to continue, or "
                            "a new --out")
        if ckpt is None:
            return None, None
        try:
            return ckpt, read_state(ckpt)
        except CorruptCheckpoint:
            if resume != "latest":
                raise
            return ckpt, {}  # `restore` falls back to an older checkpoint

    def should_save(self, step: int, total: int, stopping: bool) -> bool:
        return step % self.save_every == 0 or step == total or stopping

    def save(self, accelerator: Accelerator, step: int, trainer_state: dict, parts: CheckpointParts) -> Path:
        try:
            return self._save(accelerator, step, trainer_state, parts)
        except StorageError as e:  # the upload of a checkpoint saved in the staging folder
            raise UserError(f"uploading checkpoint {self.run.location / 'checkpoints' / f'step_{step:08d}'} failed "
                            f"({e}); {self._kept_in_bucket()}; fix the storage and rerun with --resume "
                            "latest") from None
        except Exception as e:  # noqa: BLE001 - torch.save and safetensors report a full disk in their own types
            if peer_lost(e):
                raise
            kept = latest_checkpoint(self.run_dir)
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
            kept = f"the newest complete checkpoint {kept} is kept" if kept else "no checkpoint is complete yet"
            if self.run.remote:
                kept = self._kept_in_bucket()
            raise UserError(f"writing checkpoint {checkpoint_dir(self.run_dir, step)} failed ({reason}); {kept}; fix "
                            "the file system (free space, permissions) and rerun with --resume latest") from None

    def _kept_in_bucket(self) -> str:
        """What a failed save leaves in the bucket, as far as a listing can tell now."""
        try:
            names = self.run.checkpoint_names()
        except StorageError:
            return f"the complete checkpoints in {self.run.location / 'checkpoints'} are kept"
        where = self.run.location / "checkpoints"
        return f"the newest complete checkpoint {where / names[-1]} is kept" if names else \
            "no checkpoint is complete yet"

    def _save(self, accelerator: Accelerator, step: int, trainer_state: dict, parts: CheckpointParts) -> Path:
        """Every process saves its parts; the main process writes the marker last, then prunes."""
        ckpt = checkpoint_dir(self.run_dir, step)
        if accelerator.is_main_process:
            if ckpt.exists():
                shutil.rmtree(ckpt)  # an incomplete leftover of the same step
            with naming(ckpt):
                ckpt.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_parts(accelerator, ckpt, parts)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_atomically(ckpt / STATE_FILE, json.dumps(trainer_state | {"checkpoint_format": FORMAT}, indent=1))
            fsync_dir(ckpt)
            write_bytes(ckpt / MARKER, f"step {step}\n".encode())
            fsync_dir(ckpt)
            self.run.push()  # an object-store run: the metrics first, so that a complete checkpoint's are there
            self.run.push_checkpoint(ckpt.name)  # then the checkpoint, its marker last
            self._prune()
        accelerator.wait_for_everyone()
        return ckpt

    @staticmethod
    def load(accelerator: Accelerator, ckpt: Path, state: dict, parts: CheckpointParts) -> None:
        try:
            if state.get("checkpoint_format") is None:  # written by Accelerate's save_state
                for part in parts.extra.values():
                    accelerator.register_for_checkpointing(part)
                accelerator.load_state(str(ckpt))
            else:
                load_parts(accelerator, ckpt, parts)
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file means the checkpoint cannot be trusted
            raise CorruptCheckpoint(ckpt, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None

    def restore(self, accelerator: Accelerator, resume: str | None, ckpt: Path, state: dict,
                check: Callable[[Path, dict], None], parts: CheckpointParts) -> tuple[Path, dict]:
        """Load `ckpt` (found by `find`) after check(ckpt, state). With --resume latest, a checkpoint
        whose files cannot be read gives way to the next older complete one, and the log says so; an
        explicitly named one that cannot be read is refused."""
        candidates: list[Path | str] = [ckpt]
        if resume == "latest":
            candidates += [name for name in reversed(self.run.checkpoint_names()) if name != ckpt.name]
        first = None
        for i, choice in enumerate(candidates):
            candidate = choice if isinstance(choice, Path) else self.run.checkpoint(choice)
            try:
                cand_state = state if i == 0 and state else read_state(candidate)
                check(candidate, cand_state)
                self.load(accelerator, candidate, cand_state, parts)
                return candidate, cand_state
            except CorruptCheckpoint as e:
                if resume != "latest":
                    raise
                first = first or e
                if i + 1 < len(candidates):
                    older = shown(checkpoint_dir(self.run_dir, _step(candidates[i + 1])))
                    logger.warning(f"checkpoint {shown(e.ckpt)} is corrupt ({e.reason}); resuming from the previous "
                                   f"complete checkpoint {older} instead")
        assert first is not None
        raise UserError(f"--resume latest: checkpoint {shown(first.ckpt)} is corrupt ({first.reason}), and no older "
                        f"complete checkpoint of {self.run} can be read; start a new --out")


    def _prune(self) -> None:
        """Retention here, and in the bucket for an object-store run."""
        prune(self.run_dir, self.keep_last)
        self.run.retain(self.keep_last)


def _step(checkpoint: Path | str) -> int:
    return int((checkpoint.name if isinstance(checkpoint, Path) else checkpoint).removeprefix("step_"))


def prune(run_dir: Path, keep: int) -> None:
    """Remove incomplete checkpoint dirs and all but the newest `keep` complete ones."""
    root = run_dir / "checkpoints"
    done = complete_checkpoints(run_dir)
    newest = done[-1] if done else None
    for p in root.iterdir():
        if p.is_dir() and p != newest and (p not in done or p in done[: max(len(done) - max(keep, 1), 0)]):
            shutil.rmtree(p, ignore_errors=True)
