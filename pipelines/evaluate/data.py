"""Labelled images for evaluation: ImageFolder trees (`<split>/<class>/*.jpg`) or WebDataset shards with
`cls`, and the anchors' transforms (Resize 256 bicubic + CenterCrop 224 for features and validation;
RandomResizedCrop + flip for the official linear probe, its draws keyed by (seed, epoch, index))."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as tvf
from torch.utils.data import Dataset

from cae2.errors import UserError, naming
from pipelines.shards import IMAGE_FIELDS, IMAGE_SUFFIXES, expand_shards, image_bytes, iter_shard
from targets.local_copies import cache_root
from targets.views import DecodeError, decode_image, image_problem, random_resized_crop

logger = logging.getLogger(__name__)

TF: Any = tvf  # torchvision types these for tensors; they take PIL images too


@dataclass
class LabelledImages:
    """Images with integer labels; `load(i)` -> bytes. Shards are read into memory (evaluation sets)."""

    spec: str
    labels: np.ndarray
    classes: list[str]
    paths: list[Path] | None = None
    blobs: list[bytes] | None = None
    members: list[tuple[str, int, int]] | None = None
    """(local shard, byte offset, size) of each image: read on demand, so a shard set of any size fits."""
    files: list[tuple[str, int, int]] = field(default_factory=list)
    """(path, size, mtime_ns) of every file read: images of a folder, or shards (a remote shard: (url, -1, a hash
    of its images' bytes))."""

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int, limit: int | None = None) -> bytes:
        """The bytes of image i (its first `limit` bytes: enough for a header)."""
        if self.paths is not None:
            with naming(self.paths[i]), open(self.paths[i], "rb") as f:
                return f.read(-1 if limit is None else limit)
        if self.members is not None:
            path, offset, size = self.members[i]
            with naming(path), open(path, "rb") as f:
                return os.pread(f.fileno(), size if limit is None else min(size, limit), offset)
        assert self.blobs is not None, "labelled images without paths, members or blobs"
        return self.blobs[i][:limit]

    def name(self, i: int) -> str:
        if self.paths is not None:
            return str(self.paths[i])
        return f"{self.members[i][0]} image {i}" if self.members is not None else f"{self.spec} image {i}"

    def keep(self, rows: list[int]) -> LabelledImages:
        pick = np.array(rows, np.int64)
        return dataclasses.replace(
            self, labels=self.labels[pick],
            paths=[self.paths[i] for i in rows] if self.paths is not None else None,
            members=[self.members[i] for i in rows] if self.members is not None else None,
            blobs=[self.blobs[i] for i in rows] if self.blobs is not None else None)

    def decode(self, i: int):
        """Image i as RGB; a file that cannot be decoded though its header could is named in one line."""
        try:
            return decode_image(self.load(i))
        except DecodeError as e:
            raise UserError(f"{self.name(i)} cannot be decoded ({e}); remove or replace it") from None

    @functools.cached_property
    def identity(self) -> str:
        """sha256 of the files (names, sizes, modification times), labels and class names: what a feature
        cache is keyed by, so that changed, moved or relabelled images are never served stale features."""
        h = hashlib.sha256(json.dumps([self.files, self.classes]).encode())
        h.update(self.labels.tobytes())
        return h.hexdigest()


def _stat(path: Path | str) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def load_labelled(spec: str, option: str, classes: list[str] | None = None) -> LabelledImages:
    """An ImageFolder directory (class sub-folders) or WebDataset shards with `cls`. `classes`: the
    training split's class names, which a validation split must use."""
    path = Path(spec)
    if path.is_dir() and not any(path.glob("*.tar")):
        data = _image_folder(path, spec, option, classes)
    else:
        data = _labelled_shards(spec, option, classes)
    data = _without_non_images(data, option)
    if not len(data):
        raise UserError(f"{option} {spec}: no images")
    unlabelled = int((data.labels < 0).sum())
    if unlabelled:
        which = "these shards carry no labels" if unlabelled == len(data) else f"{unlabelled} images carry no label"
        raise UserError(f"{option} {spec}: {which} (cls -1: made from a list of files or a flat folder); evaluation "
                        "needs labelled images: make-shards of class folders, or an ImageFolder tree")
    if classes is None and len(np.unique(data.labels)) < 2:
        raise UserError(f"{option} {spec}: one class only; classification needs at least two")
    return data


_HEADER_BYTES = 1 << 14


def _without_non_images(data: LabelledImages, option: str) -> LabelledImages:
    """Files that are not images (a text file named .jpg, an empty file) are left out and counted, as stage 1
    skips them; only headers are read (the first 16 KiB; the whole file where the header runs past them), once
    per set of files: the finding is kept in the local cache under the set's identity (names, sizes, times)."""
    record = cache_root() / "image-checks" / f"{data.identity}.json"
    skipped = _recorded(record, len(data))
    if skipped is None:
        skipped = []
        for i in range(len(data)):
            head = data.load(i, _HEADER_BYTES)
            problem = image_problem(head)
            if problem and len(head) == _HEADER_BYTES:
                problem = image_problem(data.load(i))
            if problem:
                skipped.append((i, problem))
        _record(record, len(data), skipped)
    if not skipped:
        return data
    first, reason = skipped[0]
    logger.warning(f"{option} {data.spec}: skipped {len(skipped)} of {len(data)} files that are not images "
                   f"(first: {data.name(first)}: {reason})")
    left_out = {i for i, _ in skipped}
    return data.keep([i for i in range(len(data)) if i not in left_out])


def _recorded(record: Path, images: int) -> list[tuple[int, str]] | None:
    """The files an earlier check of this set left out (None: not checked, or a record that does not fit)."""
    try:
        saved = json.loads(record.read_text())
        skipped = [(int(i), str(reason)) for i, reason in saved["skipped"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return skipped if saved.get("images") == images and all(0 <= i < images for i, _ in skipped) else None


def _record(record: Path, images: int, skipped: list[tuple[int, str]]) -> None:
    """Keep the check's finding (a cache: a folder that cannot be written costs a check next time, no more)."""
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"images": images, "skipped": skipped}))
        tmp.replace(record)
    except OSError as e:
        logger.debug(f"image check not kept in {record}: {e}")
        tmp.unlink(missing_ok=True)


def _image_folder(path: Path, spec: str, option: str, classes: list[str] | None) -> LabelledImages:
    found = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"{option} {spec}: no class folders; expected the ImageFolder layout "
                        f"{spec}/<class>/<image> (or WebDataset shards with cls)")
    names = classes if classes is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise UserError(f"{option} {spec}: class folder(s) {', '.join(unknown[:5])} are not in the training "
                        "split's classes")
    index = {c: i for i, c in enumerate(names)}
    paths, labels = [], []
    for c in found:
        for p in sorted((path / c).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(index[c])
    return LabelledImages(spec, np.array(labels, np.int64), list(names), paths=paths, files=[_stat(p) for p in paths])


def _labelled_shards(spec: str, option: str, classes: list[str] | None) -> LabelledImages:
    """Local shards are indexed (image offsets) and read on demand; remote ones are read into memory."""
    blobs, members, labels, files = [], [], [], []
    for shard in expand_shards(spec, option):
        local, content = "://" not in shard.url, hashlib.sha256()
        for key, image, label in (_index_tar(shard.url) if local else _read_samples(shard.url)):
            if image is None or label is None:
                raise UserError(f"{option} {shard.url}: sample {key} has no image or no cls label; evaluation shards "
                                "need both (cae2 make-shards of class folders)")
            if not local:
                content.update(image)
            (members if local else blobs).append(image)
            labels.append(label)
        # A remote shard is known by its images' bytes (no modification time to trust across object stores).
        files.append(_stat(shard.url) if local else (shard.url, -1, int(content.hexdigest()[:15], 16)))
    labels = np.array(labels, np.int64)
    n = int(labels.max()) + 1 if len(labels) else 0
    names = classes if classes is not None else [str(i) for i in range(n)]
    if len(labels) and labels.max() >= len(names):
        raise UserError(f"{option} {spec}: label {int(labels.max())} is outside the training split's "
                        f"{len(names)} classes")
    return LabelledImages(spec, labels, names, blobs=blobs if blobs else None, members=members if members else None,
                          files=files)


def _index_tar(path: str):
    """(key, (path, offset, size) of its image, label) of every sample of a local tar shard, in order."""
    samples: dict[str, dict] = {}
    try:
        with naming(path), tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                entry = samples.setdefault(key, {})
                file = tar.extractfile(m) if ext == "cls" else None
                if file is not None:
                    entry["cls"] = int(file.read())
                elif ext in IMAGE_FIELDS and "image" not in entry:
                    entry["image"] = (path, m.offset_data, m.size)
    except (tarfile.TarError, ValueError) as e:
        raise UserError(f"shard {path} cannot be read ({type(e).__name__}: {e}); check or rewrite the shard") from None
    for key, entry in samples.items():
        yield key, entry.get("image"), entry.get("cls")


def _read_samples(url: str):
    for sample in iter_shard(url):
        yield sample["__key__"], image_bytes(sample), int(sample["cls"]) if "cls" in sample else None


def eval_resize(size: int) -> int:
    """The anchors' resize before the center crop: 256 for 224 (the same ratio for other sizes)."""
    return round(size * 256 / 224)


class CenterCropImages(Dataset):
    """Resize (shorter side, bicubic, antialiased) + CenterCrop -> uint8 [3, S, S], label, index."""

    def __init__(self, data: LabelledImages, size: int):
        self.data, self.size = data, size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        img = TF.resize(self.data.decode(i), eval_resize(self.size),
                        interpolation=TF.InterpolationMode.BICUBIC)
        img = TF.center_crop(img, self.size)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), int(self.data.labels[i]), i


class AugmentedImages(Dataset):
    """RandomResizedCrop (scale 0.08..1, bicubic) + horizontal flip, the draws keyed by (seed, epoch,
    index) so that a resumed run sees the same crops."""

    def __init__(self, data: LabelledImages, size: int, seed: int):
        self.data, self.size, self.seed, self.epoch = data, size, seed, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        img = self.data.decode(i)
        rng = np.random.default_rng([self.seed, self.epoch, i, 0x11E])
        top, left, h, w = random_resized_crop(rng, img.height, img.width, (0.08, 1.0), (3 / 4, 4 / 3))
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=TF.InterpolationMode.BICUBIC)
        if rng.uniform() < 0.5:
            img = TF.hflip(img)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), int(self.data.labels[i]), i
