"""`cae2 inspect STORE`: what a target store holds and how the jobs writing it are doing, read without
disturbing them (no claims, no writes to the store; an object store's files are read into the local mirror).

Units are counted from their completion markers and claims; the units not started are the jobs' recorded plans
(STORE/.plans, written by extract-targets) or the --shards given, less the complete and claimed ones. The rate
is the units completed in the last `window` seconds (by their markers' times), the ETA the units left at that
rate."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from targets.claims import STALE_AFTER, Holder, claims_within, holder_alive, read_claim
from targets.storage import Location
from targets.store import TargetStore

WINDOW = 600.0
"""Seconds of completed units the rate is measured over."""


@dataclass
class ClaimStatus:
    unit: str
    host: str
    pid: int
    job: str
    started: str
    heartbeat_age_s: float
    alive: bool


@dataclass
class StoreStatus:
    store: str
    teacher: str
    pretrained: str
    views_per_image: int
    seed: int
    latent_format: str
    grid: list[int]
    latent_dim: int
    decoder: str
    created: str
    now: str
    units_complete: int = 0
    units_planned: int | None = None
    """Units the jobs recorded they mean to write (or the --shards given); None: unknown."""
    units_not_started: int | None = None
    units_abandoned: list[str] = field(default_factory=list)
    """Incomplete units that no live process holds: the next extract-targets redoes them."""
    units_damaged: dict[str, str] = field(default_factory=dict)
    claims: list[ClaimStatus] = field(default_factory=list)
    images: int = 0
    views: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    """Reason -> the first sample skipped for it (unit and key)."""
    window_s: float = WINDOW
    rate_span_s: float = 0.0
    """The time the rate is measured over: the window, or the store's age when it is younger."""
    units_in_window: int = 0
    units_per_minute: float | None = None
    views_per_second: float | None = None
    eta_s: float | None = None
    int8: dict | None = None
    """int8 stores: the per-unit recorded error (min token cosine: lowest, percentiles; the worst unit)."""
    read_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def live_claims(self) -> list[ClaimStatus]:
        return [c for c in self.claims if c.alive]

    def render(self) -> str:
        """The status screen."""
        lines = [f"target store {self.store}",
                 f"  teacher   {self.teacher} ({self.pretrained}), K = {self.views_per_image} views per image, seed "
                 f"{self.seed}, {self.latent_format}, grid {self.grid[0]}x{self.grid[1]}, dim {self.latent_dim}, "
                 f"decoder {self.decoder}; created {self.created}"]
        live = len(self.live_claims)
        parts = [f"{self.units_complete:,} complete", f"{live} being written"]
        if len(self.claims) > live:
            parts.append(f"{len(self.claims) - live} held by stale claims")
        if self.units_abandoned:
            parts.append(f"{len(self.units_abandoned)} incomplete and not held (redone by the next run)")
        if self.units_damaged:
            parts.append(f"{len(self.units_damaged)} damaged")
        if self.units_planned is None:
            parts.append("not started: unknown (no job recorded its shards; pass --shards)")
        else:
            parts.append(f"{self.units_not_started:,} not started, of {self.units_planned:,} planned")
        lines.append(f"  units     {', '.join(parts)}")
        lines.append(f"  written   {self.images:,} images, {self.views:,} views, {_size(self.bytes)}")
        if self.units_per_minute is None:
            lines.append(f"  rate      no unit completed in the last {self.window_s / 60:.0f} min")
        else:
            eta = "" if self.eta_s is None else (
                "; done" if self.eta_s == 0 else f"; ETA {_duration(self.eta_s)} at this rate")
            lines.append(f"  rate      {self.units_per_minute:.2f} units/min, {self.views_per_second:,.1f} views/s "
                         f"over the last {_duration(self.rate_span_s)}{eta}")
        by_job: dict[tuple[str, int], list[ClaimStatus]] = {}
        for c in self.claims:
            by_job.setdefault((c.host, c.pid), []).append(c)
        for i, ((host, pid), claims) in enumerate(sorted(by_job.items())):
            c = min(claims, key=lambda c: c.heartbeat_age_s)
            state = "alive" if c.alive else ("STALE (its process has ended or has sent no heartbeat for "
                                             f"{STALE_AFTER / 60:.0f} min: the next job takes its units over)")
            lines.append(f"  {'jobs' if i == 0 else '':<9} {host} pid {pid}{f' job {c.job}' if c.job else ''}: "
                         f"{len(claims)} unit(s) ({', '.join(sorted(x.unit for x in claims)[:3])}"
                         f"{', ...' if len(claims) > 3 else ''}), heartbeat {_duration(c.heartbeat_age_s)} ago, "
                         f"{state}")
        if not by_job:
            lines.append("  jobs      none holds a unit now")
        if self.skipped:
            reasons = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append(f"  skipped   {sum(self.skipped.values()):,} images:")
            lines += [f"            {n:,} {reason} (e.g. {self.skipped_examples[reason]})" for reason, n in reasons[:8]]
            if len(reasons) > 8:
                lines.append(f"            and {len(reasons) - 8} more reasons (`--json` lists them all)")
        else:
            lines.append("  skipped   none")
        if self.int8:
            q = self.int8
            lines.append(f"  int8      min token cosine {q['min_token_cosine']:.6f} (unit {q['worst_unit']}, key "
                         f"{q['worst']['key']}), mean {q['mean_token_cosine']:.6f}; per-unit minimum: p1 "
                         f"{q['unit_min_p1']:.6f}, median {q['unit_min_median']:.6f}")
        for unit, why in sorted(self.units_damaged.items())[:5]:
            lines.append(f"  damaged   {unit}: {why}")
        if len(self.units_damaged) > 5:
            lines.append(f"            and {len(self.units_damaged) - 5} more (`cae2 verify-targets` names them all)")
        return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _time(iso: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def is_store(path: str) -> bool:
    """Whether PATH (local or in an object store) holds a target store's root metadata."""
    where = Location.of(path)
    return (where / "zarr.json").exists() if where.remote else (where.path / "zarr.json").is_file()


def store_status(path: str, planned: list[str] | None = None, window: float = WINDOW) -> StoreStatus:
    """Read the status of a target store (local or in an object store). planned: the units the caller expects
    (the names of the shards); None: the plans recorded in the store."""
    t0 = time.perf_counter()
    store = TargetStore.open(path)
    m = store.meta
    now = time.time()  # this host's clock: the store's would cost a write (markers carry their writers' clocks too)
    status = StoreStatus(
        store=str(path), teacher=m.teacher.get("name", "?"), pretrained=str(m.teacher.get("pretrained", "?")),
        views_per_image=m.views_per_image, seed=m.seed, latent_format=m.latent_format, grid=list(m.grid),
        latent_dim=m.latent_dim, decoder=m.decoder, created=m.created,
        now=dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"), window_s=window)
    names = store.unit_names()
    complete, recent_views, errors = _count_units(store, names, status, now)
    _read_claims(store, status, now)
    held = {c.unit for c in status.claims if c.alive}
    status.units_abandoned = sorted(set(names) - complete - set(status.units_damaged) - held)
    plan = set(planned) if planned is not None else store.planned_units()
    if plan is not None:
        status.units_planned = len(plan | complete)
        status.units_not_started = len(plan - complete - held - set(status.units_damaged) -
                                       set(status.units_abandoned))
    _rate(status, recent_views, max(now - (_time(m.created) or now), 1.0))
    status.int8 = errors.summary()
    status.read_seconds = round(time.perf_counter() - t0, 3)
    return status


class _Int8Errors:
    """The quantisation error each complete int8 unit's marker records, gathered."""

    def __init__(self):
        self.unit_minima: list[float] = []
        self.worst: tuple[float, str, dict] | None = None
        self.cos_sum = self.tokens = 0.0

    def add(self, unit: str, q: dict | None) -> None:
        if not q or not q.get("tokens"):
            return
        self.unit_minima.append(float(q["min_token_cosine"]))
        self.cos_sum += float(q["mean_token_cosine"]) * q["tokens"]
        self.tokens += q["tokens"]
        if self.worst is None or q["min_token_cosine"] < self.worst[0]:
            self.worst = (float(q["min_token_cosine"]), unit, q.get("worst") or {})

    def summary(self) -> dict | None:
        if self.worst is None:
            return None
        minima = self.unit_minima
        return {"min_token_cosine": self.worst[0], "worst_unit": self.worst[1], "worst": self.worst[2],
                "mean_token_cosine": self.cos_sum / self.tokens, "units": len(minima),
                "unit_min_p1": float(np.percentile(minima, 1)), "unit_min_median": float(np.median(minima)),
                "unit_min_histogram": _histogram(minima)}


def _count_units(store: TargetStore, names: list[str], status: StoreStatus,
                 now: float) -> tuple[set[str], int, _Int8Errors]:
    """Count the complete units (images, views, bytes, skips, int8 errors) and the damaged ones -> (complete,
    views of the units completed within the window, int8 errors)."""
    if store.remote:
        store.prefetch_markers(names)
    complete: set[str] = set()
    recent_views = 0
    errors = _Int8Errors()
    skipped: Counter = Counter()
    k = store.meta.views_per_image
    for name in names:
        marker, damage = store.unit_state(name)
        if damage:
            status.units_damaged[name] = damage
        if marker is None:
            continue
        complete.add(name)
        valid = int(marker.get("num_valid", marker["num_samples"]))
        status.images += valid
        status.views += valid * k
        status.bytes += sum(size or 0 for size in marker.get("files", {}).values())
        for s in marker.get("skipped", ()):
            reason = str(s.get("reason", "?"))
            skipped[reason] += 1
            status.skipped_examples.setdefault(reason, f"{name} key {s.get('key', '?')}")
        when = _time(marker.get("completed", ""))
        if when is not None and now - when <= status.window_s:
            status.units_in_window += 1
            recent_views += valid * k
        errors.add(name, marker.get("quantization"))
    status.units_complete = len(complete)
    status.skipped = dict(skipped)
    return complete, recent_views, errors


def _read_claims(store: TargetStore, status: StoreStatus, now: float) -> None:
    """Every unit claim: its holder, heartbeat age and whether the holder is alive (read, never taken)."""
    for claim in claims_within(store.location if store.remote else store.path):
        holder, age = read_claim(claim, dt.datetime.fromtimestamp(now, dt.UTC))
        unit = claim.name.removesuffix(".claim")
        alive = True
        if holder is None:  # its creator is writing it right now: held, alive
            holder = Holder("?", 0, None, "", "")
        else:
            alive = holder_alive(holder, age)
        status.claims.append(ClaimStatus(unit, holder.host, holder.pid, holder.job, holder.started, round(age, 1),
                                         alive))


def _rate(status: StoreStatus, recent_views: int, age: float) -> None:
    """Units and views per time over the window (or the store's age, when younger), and the ETA at that rate."""
    if not status.units_in_window:
        return
    span = status.rate_span_s = min(status.window_s, age)
    status.units_per_minute = status.units_in_window / span * 60
    status.views_per_second = recent_views / span
    if status.units_planned is not None:
        left = status.units_planned - status.units_complete
        status.eta_s = left / status.units_per_minute * 60 if left > 0 else 0.0


def _histogram(values: list[float], bins: int = 10) -> dict:
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
