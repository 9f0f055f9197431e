"""Checkpoints that survive preemption.

RUN_DIR/checkpoints/step_00001000/ holds Accelerate's state (model, optimizer, grad scaler, RNG
states of every process) plus trainer_state.json (global step, epoch, data position, model config).
The file COMPLETE is written last, by the main process after every process has saved: a directory
without it never counts, and is removed. Retention keeps the newest `keep` complete checkpoints and
never deletes the newest complete one. The readers at the end (`find_checkpoint`, `model_config_of`,
`model_state_dict`) serve every command that starts from a run: export, evaluate, a resume.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from cae2.config import ModelConfig
from cae2.errors import UserError, naming

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"


class CorruptCheckpoint(UserError):
    """A complete checkpoint whose files cannot be read; `reason` says which and why."""

    def __init__(self, ckpt: Path, reason: str):
        super().__init__(f"checkpoint {ckpt} is corrupt ({reason}); pass --resume with an older checkpoint")
        self.ckpt, self.reason = ckpt, reason


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


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


class _KeepsWriteError(io.RawIOBase):
    """A file for torch.save that remembers the OSError of a refused write: torch's zip writer turns it
    into a RuntimeError ("unexpected pos 64 vs 0") without the errno."""

    def __init__(self, file):
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise


def save_torch(obj, path: str | os.PathLike, *, _save=torch.save) -> None:
    """torch.save to `path`; a write the file system refuses (EIO, ENOSPC) raises its OSError naming the
    file, where torch.save(obj, path) would report only "unexpected pos" or "iostream error"."""
    with naming(path), open(path, "wb") as f:
        sink = _KeepsWriteError(f)
        try:
            _save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None


@contextlib.contextmanager
def _torch_saves_keep_their_errors():
    """While Accelerate saves a checkpoint, its torch.save(obj, path) calls go through save_torch."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if args or kwargs or not isinstance(f, (str, os.PathLike)):
            return original(obj, f, *args, **kwargs)
        return save_torch(obj, f, _save=original)

    torch.save = save
    try:
        yield
    finally:
        torch.save = original


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save on every process; the main process writes the marker last, then prunes old checkpoints."""
    ckpt = checkpoint_dir(run_dir, step)
    if accelerator.is_main_process and ckpt.exists():
        shutil.rmtree(ckpt)  # an incomplete leftover of the same step
    accelerator.wait_for_everyone()
    with _torch_saves_keep_their_errors():
        accelerator.save_state(str(ckpt), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        follow_umask(p for p in ckpt.iterdir() if p.is_file())
        tmp = ckpt / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(trainer_state, indent=1))
        os.replace(tmp, ckpt / STATE_FILE)
        _fsync_dir(ckpt)
        (ckpt / MARKER).write_text(f"step {step}\n")
        _fsync_dir(ckpt)
        prune(run_dir, keep)
    accelerator.wait_for_everyone()
    return ckpt


class Checkpointer:
    """A run's checkpoints: which one a run resumes from, when to save, saving with retention, loading."""

    def __init__(self, run_dir: Path, save_every: int, keep_last: int):
        self.run_dir, self.save_every, self.keep_last = Path(run_dir), save_every, keep_last

    def find(self, resume: str | None) -> tuple[Path | None, dict | None]:
        """(checkpoint, its trainer state) to resume from, or (None, None) for a fresh run; a fresh run
        into a directory that holds checkpoints is refused."""
        ckpt = resolve_resume(resume, self.run_dir)
        root = self.run_dir / "checkpoints"
        if ckpt is None and resume != "latest" and root.is_dir() and any(root.iterdir()):
            raise UserError(f"--out {self.run_dir} already holds checkpoints; pass --resume latest to continue, or "
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

    def save(self, accelerator, step: int, trainer_state: dict) -> Path:
        try:
            return save_checkpoint(accelerator, self.run_dir, step, trainer_state, self.keep_last)
        except Exception as e:  # noqa: BLE001 - torch.save and safetensors report a full disk in their own types
            kept = latest_checkpoint(self.run_dir)
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
            kept = f"the newest complete checkpoint {kept} is kept" if kept else "no checkpoint is complete yet"
            raise UserError(f"writing checkpoint {checkpoint_dir(self.run_dir, step)} failed ({reason}); {kept}; fix "
                            "the file system (free space, permissions) and rerun with --resume latest") from None

    @staticmethod
    def load(accelerator, ckpt: Path) -> None:
        try:
            accelerator.load_state(str(ckpt))
        except Exception as e:  # noqa: BLE001 - any unreadable file means the checkpoint cannot be trusted
            raise CorruptCheckpoint(ckpt, f"{type(e).__name__}: {e}") from None

    def restore(self, accelerator, resume: str | None, ckpt: Path, state: dict, check, log=print) -> tuple[Path, dict]:
        """Load `ckpt` (found by `find`) after check(ckpt, state). With --resume latest, a checkpoint
        whose files cannot be read gives way to the next older complete one, and the log says so; an
        explicitly named one that cannot be read is refused."""
        candidates = [ckpt]
        if resume == "latest":
            candidates += [c for c in reversed(complete_checkpoints(self.run_dir)) if c != ckpt]
        first = None
        for i, candidate in enumerate(candidates):
            try:
                cand_state = state if i == 0 and state else read_state(candidate)
                check(candidate, cand_state)
                self.load(accelerator, candidate)
                return candidate, cand_state
            except CorruptCheckpoint as e:
                if resume != "latest":
                    raise
                first = first or e
                if i + 1 < len(candidates):
                    log(f"WARNING: checkpoint {e.ckpt} is corrupt ({e.reason}); resuming from the previous complete "
                        f"checkpoint {candidates[i + 1]} instead")
        raise UserError(f"--resume latest: checkpoint {first.ckpt} is corrupt ({first.reason}), and no older complete "
                        f"checkpoint of {self.run_dir} can be read; start a new --out")


def prune(run_dir: Path, keep: int) -> None:
    """Remove incomplete checkpoint dirs and all but the newest `keep` complete ones."""
    root = run_dir / "checkpoints"
    done = complete_checkpoints(run_dir)
    newest = done[-1] if done else None
    for p in root.iterdir():
        if p.is_dir() and p != newest and (p not in done or p in done[: max(len(done) - max(keep, 1), 0)]):
            shutil.rmtree(p, ignore_errors=True)


def follow_umask(paths) -> None:
    """Give files the mode the process's umask asks for (0644 under umask 022): safetensors writes its
    files through a temporary file of mode 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o666 & ~mask)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading a run's weights (export, evaluate) ------------------------------------------------------

def find_checkpoint(path: Path) -> Path:
    """A complete checkpoint dir itself, or a run dir's newest complete one."""
    if (path / MARKER).is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"{path} is neither a complete checkpoint nor a run dir with one")
    return ckpt


def model_config_of(ckpt: Path) -> ModelConfig:
    raw = dict(read_state(ckpt)["model_config"])
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def model_state_dict(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The checkpoint's model weights with Accelerate's and torch.compile's wrapper prefixes removed;
    with `prefix`, only the keys under it, without it (e.g. "encoder.")."""
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"checkpoint {ckpt} has no model.safetensors")
    out = {}
    for k, v in load_file(str(weights)).items():
        for wrapper in ("module.", "_orig_mod."):
            k = k.removeprefix(wrapper)
        if k.startswith(prefix):
            out[k.removeprefix(prefix)] = v.contiguous()
    if not out:
        raise UserError(f"checkpoint {ckpt}: no {prefix.rstrip('.') or 'model'} weights in model.safetensors")
    return out


def beit_metadata(kwargs: dict, classes: list[str]) -> dict[str, str]:
    """What a fine-tuned network's .safetensors records: timm's class and arguments, the class names."""
    return {"format": "timm.Beit", "timm_class": "Beit", "timm_kwargs": json.dumps(kwargs),
            "classes": json.dumps(classes)}
