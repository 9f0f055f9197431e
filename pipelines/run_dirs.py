"""A run directory (pretrain, finetune, the official probe) on local disk or in an object store.

In an object store the run works in a local staging folder (CACHE/runs/<scheme>/<bucket>/<key>, never
evicted) and the bucket gets what it needs to go on elsewhere: config.json when the run starts; with each
checkpoint, metrics.jsonl and the TensorBoard files first (a complete checkpoint's records are there), then
the checkpoint's files, its COMPLETE marker last; the same files at the end; old checkpoints are deleted
there too. A resume (on any machine) fetches the newest complete checkpoint and the metrics from the bucket.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from cae2.errors import naming
from targets.local_copies import cache_root
from targets.storage import Location, Meta

MARKER = "COMPLETE"
LEDGER = ".etags.json"
"""In a staging folder: {file: the etag of its object in the bucket} for the files uploaded or fetched, so that
a resume fetches again every file whose object is not the one this folder holds (size alone could match)."""
SYNCED = ("config.json", "metrics.jsonl", "tensorboard", "result.json", "model.safetensors")
"""What a run dir holds besides its checkpoints, pushed to the bucket with each checkpoint and at the end."""


def shown(path: str | Path) -> str:
    """A path as users know it: a file in a run's staging folder is named by its object-store URL."""
    runs = cache_root() / "runs"
    path = Path(path)
    if not path.is_relative_to(runs) or len(path.relative_to(runs).parts) < 2:
        return str(path)
    scheme, *rest = path.relative_to(runs).parts
    return f"{scheme}://{'/'.join(rest)}"


class RunDir:
    """Where a run lives (`location`) and where it works (`local`: the run dir itself, or its staging folder)."""

    def __init__(self, where: str | Path | Location):
        self.location = Location.of(where)
        if self.location.remote:
            scheme, rest = self.location.url.split("://", 1)
            self.local = cache_root() / "runs" / scheme / rest
        else:
            self.local = self.location.path
        self._etags: dict[str, str] | None = None

    @property
    def remote(self) -> bool:
        return self.location.remote

    def __str__(self) -> str:
        return self.location.url

    # --- checkpoints ---------------------------------------------------------------------------------------

    def _checkpoint_objects(self) -> dict[str, dict[str, Meta]]:
        out: dict[str, dict[str, Meta]] = {}
        for m in (self.location / "checkpoints").list():
            name, _, file = m.name.partition("/")
            if file:
                out.setdefault(name, {})[file] = m
        return out

    def checkpoint_names(self) -> list[str]:
        """The names of the run's complete checkpoints, oldest first (an object-store run: the bucket's, one
        listing)."""
        if self.remote:
            return sorted(name for name, files in self._checkpoint_objects().items() if MARKER in files)
        root = self.local / "checkpoints"
        return sorted(p.name for p in root.iterdir() if (p / MARKER).is_file()) if root.is_dir() else []

    def checkpoint(self, name: str) -> Path:
        """A complete checkpoint of the run as a local folder (an object-store run's is fetched first)."""
        return self.pull_checkpoint(name) if self.remote else self.local / "checkpoints" / name

    def holds_checkpoints(self) -> bool:
        """Whether anything is under RUN/checkpoints, complete or not."""
        if self.remote:
            return bool((self.location / "checkpoints").children())
        root = self.local / "checkpoints"
        return root.is_dir() and any(root.iterdir())

    def pull_checkpoint(self, name: str) -> Path:
        """Object stores: a complete checkpoint's files into the staging folder (those it has already kept)."""
        files = self._checkpoint_objects().get(name, {})
        local = self.local / "checkpoints" / name
        for file, meta in sorted(files.items(), key=lambda f: f[0] == MARKER):  # its marker last
            target = local / file
            where = self.location / "checkpoints" / name / file
            if not self._same(target, meta):
                self._record(target, where.download(target))
        self._save_ledger()
        return local

    def push_checkpoint(self, name: str) -> None:
        """Object stores: a saved checkpoint's files, its COMPLETE marker last."""
        if not self.remote:
            return
        local = self.local / "checkpoints" / name
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == MARKER)
        for p in files:
            with naming(p):
                self._record(p, (self.location / "checkpoints" / name / str(p.relative_to(local))).upload(p))
        self._save_ledger()

    def retain(self, keep: int) -> None:
        """Object stores: all but the newest `keep` complete checkpoints deleted in the bucket, each marker
        first (so that none looks complete half gone). Local run dirs are pruned where they are saved."""
        if not self.remote:
            return
        names = self.checkpoint_names()
        for name in names[: max(len(names) - max(keep, 1), 0)]:
            (self.location / "checkpoints" / name / MARKER).delete()
            (self.location / "checkpoints" / name).delete_tree()

    # --- the rest of the run dir ---------------------------------------------------------------------------

    def pull(self, names: tuple[str, ...] = SYNCED) -> None:
        """Object stores: the run's files besides its checkpoints (those of `names`) into the staging folder."""
        if not self.remote:
            return
        for m in self.location.list():
            if m.name.split("/", 1)[0] in names and not self._same(self.local / m.name, m):
                self._record(self.local / m.name, (self.location / m.name).download(self.local / m.name))
        self._save_ledger()

    def push(self) -> None:
        """Object stores: the run's files besides its checkpoints, as they are now."""
        if not self.remote:
            return
        for name in SYNCED:
            path = self.local / name
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) \
                if path.is_dir() else []
            for p in files:
                with naming(p):
                    self._record(p, (self.location / str(p.relative_to(self.local))).upload(p))
        self._save_ledger()

    def holds_other_files(self, known: set[str]) -> list[str]:
        """The names at the top of the run dir that are not a run's."""
        if self.remote:
            return sorted(n for n in self.location.children() if n not in known)
        if not self.local.is_dir():
            return []
        return sorted(p.name for p in self.local.iterdir() if p.name not in known)


    # --- which staged files are the bucket's -------------------------------------------------------------

    def _ledger(self) -> dict[str, str]:
        if self._etags is None:
            try:
                self._etags = dict(json.loads((self.local / LEDGER).read_text()))
            except (OSError, ValueError, TypeError):
                self._etags = {}
        return self._etags

    def _record(self, path: Path, etag: str | None) -> None:
        ledger, name = self._ledger(), str(path.relative_to(self.local))
        if etag:
            ledger[name] = etag
        else:
            ledger.pop(name, None)

    def _save_ledger(self) -> None:
        if self._etags is None:
            return
        tmp = self.local / f"{LEDGER}.{uuid.uuid4().hex}"
        self.local.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(self._etags, sort_keys=True))
        os.replace(tmp, self.local / LEDGER)

    def _same(self, path: Path, meta: Meta) -> bool:
        """Whether the staged file is the object: same size, and the etag recorded when it was uploaded or
        fetched is the object's (a staging folder left by another run at the same URL is not trusted)."""
        try:
            size = path.stat().st_size
        except OSError:
            return False
        recorded = self._ledger().get(str(path.relative_to(self.local)))
        return size == meta.size and recorded is not None and recorded == meta.etag

