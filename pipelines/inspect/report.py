"""`cae2 inspect STORE --shards SHARDS --report DIR`: a page that shows what a target store holds for a
sample of its images. For each one: the image with its K crop boxes, each view as stage 2 renders it
(`targets.views.render_view`, the Pillow path every stage-2 sample takes), and the teacher's cached patch
latents as a PCA-to-RGB map (three components fitted over every sampled patch token: one colour basis for the
whole page), with the k = 3 nearest sampled images by the teacher's CLS token. Writes DIR/report.html (its
pictures inside it) and DIR/contact_sheet.png."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cae2.errors import UserError
from pipelines.inspect.store_status import StoreStatus, store_status
from pipelines.pictures import VIEW_COLOURS, PcaBasis, crop_boxes, data_uri, enlarge, fit_within, sheet, view_image
from pipelines.shards import Shard, expand_shards, iter_shard, required_image_bytes
from targets.store import TargetStore
from targets.unit_reader import UnitReader
from targets.views import ViewParams, decode_image, render_view

NEIGHBOURS = 3


@dataclass
class ViewPicture:
    index: int
    params: ViewParams
    view: torch.Tensor
    """uint8 [3, S, S], as stage 2 renders it."""
    patches: torch.Tensor
    """The cached patch latents [gh * gw, D] (float32; int8 stores: dequantised)."""
    pca: np.ndarray | None = None
    """uint8 [gh, gw, 3] in the page's colour basis."""


@dataclass
class SamplePicture:
    unit: str
    row: int
    key: str
    image: Image.Image
    views: list[ViewPicture]
    cls: torch.Tensor
    """The teacher's CLS latent of view 0 (for the neighbours)."""
    neighbours: list[tuple[int, float]] = field(default_factory=list)
    """(sample index, cosine) of the nearest other samples."""


@dataclass
class Report:
    store: TargetStore
    samples: list[SamplePicture]
    basis: PcaBasis
    html: Path
    sheet: Path


Picks = dict[Shard, tuple[UnitReader, list[int]]]
"""The rows to show of each shard, with the shard's unit."""


def _choose(store: TargetStore, shards: list[Shard], count: int, seed: int) -> Picks:
    """Up to `count` valid rows, from as many complete units as there are samples (drawn by `seed`), so that a
    store of thousands of units opens only the units it shows."""
    complete = [s for s in shards if store.marker(s.name) is not None]
    if not complete:
        raise UserError(f"--shards: none of the {len(shards)} shard(s) has a complete unit in {store.path}; pass the "
                        "shards the store was made from, or finish it with extract-targets")
    rng = np.random.default_rng(seed)
    picked = [complete[i] for i in sorted(rng.choice(len(complete), min(count, len(complete)), replace=False))]
    readers = {s: store.unit(s.name) for s in picked}
    valid = {s: np.flatnonzero(r.valid) for s, r in readers.items()}
    pool = [(s, int(row)) for s in picked for row in valid[s]]
    if not pool:
        raise UserError(f"the sampled units of {store.path} hold no valid image")
    chosen = sorted((pool[i] for i in rng.choice(len(pool), min(count, len(pool)), replace=False)),
                    key=lambda sr: (sr[0].name, sr[1]))
    out: Picks = {}
    for s, row in chosen:
        out.setdefault(s, (readers[s], []))[1].append(row)
    return out


def _sample(store: TargetStore, unit: UnitReader, row: int, data: bytes) -> SamplePicture:
    m = store.meta
    image = decode_image(data)
    views, cls = [], None
    for k in range(m.views_per_image):
        latents = torch.from_numpy(np.asarray(unit.read(row, k), dtype=np.float32))
        view = render_view(image, unit.view_int[row, k], unit.view_float[row, k], m.input_size, m.interpolation)
        views.append(ViewPicture(k, ViewParams.from_record(unit.view_int[row, k], unit.view_float[row, k]), view,
                                 latents[1:]))
        cls = latents[0] if cls is None else cls
    assert cls is not None
    return SamplePicture(unit.name, row, unit.keys[row], image, views, cls)


def collect(store: TargetStore, shards_spec: str, count: int, seed: int) -> list[SamplePicture]:
    """The sampled images with their views and cached latents, read through the stage-2 path."""
    samples = []
    for shard, (unit, rows) in _choose(store, expand_shards(shards_spec), count, seed).items():
        wanted = set(rows)
        for row, sample in enumerate(iter_shard(shard.url)):
            if row in wanted:
                if sample["__key__"] != unit.keys[row]:
                    raise UserError(f"shard {shard.url} row {row} has key {sample['__key__']!r} but the target store "
                                    f"has {unit.keys[row]!r}: pass the shards the store was made from")
                samples.append(_sample(store, unit, row, required_image_bytes(sample)))
                wanted.discard(row)
                if not wanted:
                    break
    return samples


def colour(samples: list[SamplePicture], grid: tuple[int, int]) -> PcaBasis:
    """Fit one PCA basis over every sampled patch token; give each view its map, each sample its neighbours."""
    basis = PcaBasis.fit(torch.cat([v.patches for s in samples for v in s.views]))
    for s in samples:
        for v in s.views:
            v.pca = basis.rgb(v.patches, grid)
    cls = F.normalize(torch.stack([s.cls for s in samples]), dim=-1)
    sims = cls @ cls.T
    sims.fill_diagonal_(-2.0)
    for i, s in enumerate(samples):
        top = torch.topk(sims[i], min(NEIGHBOURS, len(samples) - 1))
        s.neighbours = [(int(j), float(c)) for c, j in zip(top.values, top.indices, strict=True)]
    return basis


def boxes(sample: SamplePicture) -> list[tuple[int, int, int, int, bool]]:
    """Each view's crop box in the image's own frame (the stored box is in the flipped frame)."""
    W = sample.image.width
    return [(p.top, W - p.left - p.width if p.flip else p.left, p.height, p.width, p.flip)
            for p in (v.params for v in sample.views)]


def write_report(store_path: str, shards: str, out: str | Path, samples: int = 16, seed: int = 0,
                 status: StoreStatus | None = None) -> Report:
    """status: the store's status when the caller has read it already (the page states its totals)."""
    store = TargetStore.open(store_path)
    status = status or store_status(store_path)
    picked = collect(store, shards, samples, seed)
    basis = colour(picked, store.meta.grid)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    contact = out / "contact_sheet.png"
    _contact_sheet(picked, store.meta.input_size).save(contact, optimize=True)
    page = out / "report.html"
    page.write_text(_page(store, picked, status))
    return Report(store, picked, basis, page, contact)


def _contact_sheet(samples: list[SamplePicture], size: int) -> Image.Image:
    cell = min(size, 160)
    rows = [[crop_boxes(fit_within(s.image, 2 * cell), _scaled(s, 2 * cell)),
             *[p for v in s.views for p in (view_image(v.view), enlarge(v.pca, size) if v.pca is not None else None)]]
            for s in samples]
    return sheet(rows, cell)


def _describe(store: TargetStore, status: StoreStatus) -> list[tuple[str, str]]:
    m = store.meta
    teacher = m.teacher
    return [("store", store.path), ("teacher", f"{teacher.get('name')} ({teacher.get('pretrained')})"),
            ("views per image (K)", str(m.views_per_image)), ("seed", str(m.seed)),
            ("format", f"{m.latent_format}, {m.num_tokens} tokens ({m.grid[0]}x{m.grid[1]} + CLS) x {m.latent_dim}"),
            ("view input", f"{m.input_size} px, {m.interpolation}; decoder {m.decoder}"),
            ("view settings", ", ".join(f"{k} {_short(v)}" for k, v in m.views.items())),
            ("complete units", f"{status.units_complete:,}, {status.views:,} views, {status.bytes / 1e6:,.1f} MB"),
            ("created", m.created)]


READING = ("Each row is one sampled image. Left: the image as decoded, with each view's crop box in its colour "
           "(v0, v1, ...; <-> marks a horizontal flip). Then, for each view: the view exactly as stage 2 renders "
           "it from the stored parameters, and the teacher's cached patch latents as colours: three principal "
           "components fitted over every sampled patch token, one colour basis for the page. A sound cache shows "
           "maps that follow the view: regions of one object share a colour, the map is mirrored with a flipped "
           "view and cropped with its box. Noise, stripes, or a map that does not follow its view point to a "
           "broken store. Right: the 3 nearest sampled images by the teacher's CLS latent (cosine).")


def _page(store: TargetStore, samples: list[SamplePicture], status: StoreStatus) -> str:
    size = store.meta.input_size
    rows = []
    for i, s in enumerate(samples):
        original = data_uri(crop_boxes(fit_within(s.image, 320), _scaled(s, 320)))
        cells = [f'<td><img class="original" alt="image {i}" src="{original}">'
                 f"<div>{html.escape(s.unit)} row {s.row}<br>{html.escape(s.key)}<br>{s.image.width}x{s.image.height}"
                 "</div></td>"]
        for v, (top, left, height, width, _) in zip(s.views, boxes(s), strict=True):
            p = v.params
            c = "#{:02x}{:02x}{:02x}".format(*VIEW_COLOURS[v.index % len(VIEW_COLOURS)])
            pca = enlarge(v.pca, size) if v.pca is not None else None
            cells.append(f'<td><div style="color:{c}"><b>v{v.index}</b>{" &lt;-&gt;" if p.flip else ""}</div>'
                         f'<div class="pair"><img alt="view {i}.{v.index}" src="{data_uri(view_image(v.view))}">'
                         f'<img alt="latents {i}.{v.index}" src="{data_uri(pca) if pca else ""}"></div>'
                         f"<div>box {width}x{height} at ({left}, {top}); b {p.brightness:.2f} c {p.contrast:.2f} "
                         f"s {p.saturation:.2f}</div></td>")
        near = "".join(f'<div><img class="thumb" alt="neighbour {j}" src="{data_uri(fit_within(samples[j].image, 72))}"'
                       f"> {cos:.3f}</div>" for j, cos in s.neighbours)
        cells.append(f"<td>{near}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _describe(store, status))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cae2 inspect: {html.escape(store.path)}</title>
<style>body{{font-family:sans-serif;margin:1em;font-size:13px}} td{{vertical-align:top;padding:4px}}
img{{display:block;width:{min(size, 160)}px}} .pair{{display:flex;gap:2px}} img.thumb{{display:inline;width:auto;
vertical-align:middle}} img.original{{width:240px}} .facts th{{text-align:left;padding-right:1em}}
p{{max-width:70em}}</style></head>
<body><h1>Target store {html.escape(Path(store.path).name)}</h1>
<table class="facts">{facts}</table>
<p>{html.escape(READING)}</p>
<table class="samples">{"".join(rows)}</table>
</body></html>
"""


def _short(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(_short, value)) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _scaled(sample: SamplePicture, size: int) -> list[tuple[int, int, int, int, bool]]:
    scale = size / max(sample.image.size)
    return [(round(t * scale), round(left * scale), max(1, round(h * scale)), max(1, round(w * scale)), f)
            for t, left, h, w, f in boxes(sample)]
