"""How long `cae2 inspect STORE` takes on an ImageNet-sized store (1,282 units, 16 of them held by live claims),
on local disk and in a bucket (SeaweedFS on this host), cold (an empty local cache) and warm.

    python -m bench.inspect [--units 1282]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench._common import fake_store, make_sample_shards, publish, table
from bench.object_store import KINDS, Measured, upload_tree
from bench.s3_server import BUCKET, serving
from pipelines.inspect.store_status import store_status
from targets.claims import Holder, claim_within, try_claim


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--units", type=int, default=1282)
    ap.add_argument("--held", type=int, default=16, help="Units held by a live claim (jobs at work).")
    return ap.parse_args()


def big_store(work: Path, units: int, held: int) -> tuple[Path, list[str]]:
    """A store of `units` complete units (copies of one small unit), and `held` more claimed by this process."""
    shards = make_sample_shards(work, n=1, per_shard=1)
    (first,) = shards.glob("*.tar")
    store = fake_store(shards, work / "t.zarr", tokens=5, dim=8)
    names = [first.name] + [f"unit-{i:06d}.tar" for i in range(1, units)]
    for name in names[1:]:
        shutil.copytree(store / "units" / first.name, store / "units" / name)
    return store, names + [f"held-{i:03d}.tar" for i in range(held)]


def main() -> None:
    args = parse()
    work = Path(tempfile.mkdtemp(prefix="cae2-bench-inspect-"))
    try:
        with serving(work / "server"):
            rows = _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = ("## cae2 inspect: a store's status\n\n"
            f"`cae2 inspect STORE` on {args.units:,} complete units and {args.held} held by live claims (every "
            "marker and claim read; SeaweedFS on this host, 32 requests in flight):\n\n"
            + table(["store on", "seconds", "requests"], rows))
    publish("inspect", body)


def _measure(args: argparse.Namespace, work: Path) -> list[list]:
    store, planned = big_store(work, args.units, args.held)
    url = f"s3://{BUCKET}/inspect/t.zarr"
    upload_tree(store, url)
    me = Holder.me()
    for name in planned[args.units:]:
        assert try_claim(claim_within(store, name), me)[0] and try_claim(claim_within(url, name), me)[0]
    rows = []
    for what, where, fresh in (("local disk", str(store), False), ("bucket, cold", url, True),
                               ("bucket, warm", url, False)):
        with Measured(work, fresh_cache=fresh) as m:
            status = store_status(where, planned)
        assert status.units_complete == args.units and len(status.live_claims) == args.held, status.render()
        requests = ", ".join(f"{k} {m.requests[k]}" for k in KINDS if m.requests[k]) or "-"
        rows.append([what, m.seconds, requests])
    return rows


if __name__ == "__main__":
    main()
