"""Stage 1's main-process side: views in, in image order; the teacher runs on whole batches, and each
image's K latents come out once all of them are back."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from pipelines.extract.stream import ImageViews
from targets.decoders import decode_all
from targets.device_views import DeviceViews, Packer
from targets.quantize import quantize, token_errors
from targets.teacher import Teacher
from targets.views import DecodeError, decode_image


class TeacherQueue:
    """On a GPU, batch i's forward and its copy to the host run while the host prepares batch i + 1 (one
    batch in flight). int8 latents are quantised on the teacher's device, and their per-token error
    against its output travels with them."""

    def __init__(self, teacher: Teacher, k: int, batch_size: int, latent_format: str):
        self.teacher, self.k, self.batch_size, self.int8 = teacher, k, batch_size, latent_format == "int8"
        self.views: deque[torch.Tensor] = deque()  # view tensors not yet sent, in order
        self.queued = 0  # views in self.views
        self.waiting: deque[ImageViews] = deque()  # images whose latents are not all back, in order
        self.carried: dict[str, np.ndarray] = {}  # outputs of the first waiting image's first views
        self.in_flight: deque[tuple[dict[str, torch.Tensor], torch.cuda.Event | None]] = deque()

    def put(self, item: ImageViews) -> None:
        assert item.views is not None, "an image whose views are not cut yet"
        self.views.append(item.views)
        self.queued += len(item.views)
        self.waiting.append(item)

    def _next_batch(self, n: int) -> torch.Tensor:
        """The next n queued views as one tensor (an image's views may straddle two batches)."""
        parts, have = [], 0
        while have < n:
            v = self.views.popleft()
            if len(v) > n - have:
                self.views.appendleft(v[n - have:])
                v = v[:n - have]
            parts.append(v)
            have += len(v)
        self.queued -= n
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def launch(self, final: bool = False) -> None:
        """Send whole batches of the queued views to the teacher (all of them when final)."""
        while self.queued >= self.batch_size or (final and self.queued):
            out = self.teacher(self._next_batch(min(self.batch_size, self.queued)))
            if self.int8:
                q, scales = quantize(out)
                cos, err = token_errors(out, q, scales)
                outputs = {"latents": q, "scales": scales, "cos": cos, "err": err}
            else:
                outputs = {"latents": out.to(torch.float16)}
            if out.device.type != "cuda":
                self.in_flight.append((outputs, None))
                continue
            host = {}
            for name, t in outputs.items():
                host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host[name].copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.in_flight.append((host, done))

    def collect(self, keep_in_flight: int = 1) -> list[tuple[ImageViews, dict[str, np.ndarray]]]:
        """(image, {latents [K, 1 + T, D], and for int8 scales, cos, err [K, 1 + T]}) of every image
        completed by the batches that came back, leaving up to `keep_in_flight` batches running."""
        done = []
        while len(self.in_flight) > keep_in_flight:
            outputs, event = self.in_flight.popleft()
            if event is not None:
                event.synchronize()
            arrays = {name: t.numpy() for name, t in outputs.items()}
            if self.carried:
                arrays = {name: np.concatenate([self.carried[name], a]) for name, a in arrays.items()}
            complete = len(arrays["latents"]) // self.k
            for i in range(complete):
                rows = slice(i * self.k, (i + 1) * self.k)
                done.append((self.waiting.popleft(), {name: a[rows] for name, a in arrays.items()}))
            self.carried = {name: a[complete * self.k:].copy() for name, a in arrays.items()}
        return done


def decode_jpegs(items: list[ImageViews], device: torch.device) -> list[tuple[ImageViews, str]]:
    """Device decoder: the items' JPEG files decoded on `device` in one batch (into `item.image`). A file it
    fails on is decoded by Pillow instead (recorded); -> (item, reason) of those Pillow cannot read either."""
    jpegs = [(item, item.jpeg) for item in items if item.jpeg is not None]
    unreadable = []
    for (item, jpeg), decoded in zip(jpegs, decode_all([jpeg for _, jpeg in jpegs], device), strict=True):
        if isinstance(decoded, str):  # rare: a file whose header the device decoder took, but not its data
            item.host_reason = decoded
            try:
                decoded = torch.from_numpy(np.asarray(decode_image(jpeg.numpy().tobytes())))
            except DecodeError as e:
                unreadable.append((item, str(e)))
                continue
        item.image, item.jpeg = decoded, None
    return unreadable


def cut_views(items: list[ImageViews], views: DeviceViews, packer: Packer) -> None:
    """Device view path: the images of these items packed into one buffer and copied to the teacher's
    device (or decoded there), their views' contrast means measured and their views cut there, in one batch.
    The means come back to the host with the batch (pinned, without waiting) for the records."""
    images = packer.to_device([item.image for item in items if item.image is not None])
    assert len(images.hw) == len(items), "every item's image is decoded before its views are cut"
    counts = [len(item.view_int) for item in items]
    owner = np.repeat(np.arange(len(items)), counts)
    ints, floats = np.concatenate([i.view_int for i in items]), np.concatenate([i.view_float for i in items])
    plan = views.plan(images, owner, ints, floats)  # from the host's records: launches wait for nothing
    measured = views.measure(images, owner, ints, floats, plan)
    out = views.render(images, owner, measured, floats, plan)
    means = torch.empty(len(ints), dtype=torch.int32, pin_memory=views.device.type == "cuda")
    means.copy_(measured[:, -1], non_blocking=True)
    start = 0
    for item, k in zip(items, counts, strict=True):
        item.views, item.means, item.image = out[start:start + k], means[start:start + k], None
        start += k
