"""The target store's shard files: written as bytes on local disk, read back by plain zarr (which checks
the index crc32c) exactly as if zarr had written them; the unit checksum, old and new."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.extract.verify import verify_store
from targets.block_files import LatentsChecksum
from targets.store import TargetStore
from targets.store_meta import StoreMeta
from targets.views import ViewSettings

K, T, D, ROWS = 3, 5, 8, 4


def _meta() -> StoreMeta:
    return StoreMeta(teacher={"name": "test-latents", "random_init": True}, views=ViewSettings().to_dict(), seed=0,
                     views_per_image=K, input_size=32, grid=(2, 2), num_tokens=T, latent_dim=D,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", images_per_shard=ROWS)


def _write_unit(store: TargetStore, name: str, latents: np.ndarray, direct: bool) -> None:
    keys = [f"k{i:03d}" for i in range(len(latents))]
    writer = store.begin_unit(name, f"{name}.tar", keys)
    assert writer._direct is not None  # a local store with cae2's layout
    if not direct:
        writer._direct = None  # the zarr code path, as for a remote store
    writer.valid[:] = latents.any(axis=(1, 2, 3))
    for start in range(0, len(latents), ROWS):
        writer.write_rows(start, latents[start:start + ROWS])
    writer.finish(f"{name}.tar")


@pytest.mark.parametrize("n", [8, 10, 1])  # whole shards; a short last shard; one zero row (zarr writes no file)
def test_direct_shard_files_read_like_zarr_written_ones(tmp_path, n):
    rng = np.random.default_rng(n)
    latents = rng.standard_normal((n, K, T, D)).astype(np.float16)
    latents[n // 2] = 0  # a skipped image: all zeros
    store = TargetStore.create_or_validate(str(tmp_path / "t.zarr"), _meta())
    _write_unit(store, "direct", latents, direct=True)
    _write_unit(store, "zarr", latents, direct=False)
    shard_files = sorted((tmp_path / "t.zarr/units/direct/latents/c").rglob("*"))
    assert len([p for p in shard_files if p.is_file()]) == -(-n // ROWS)
    assert not list((tmp_path / "t.zarr").rglob("*.partial"))
    for name in ("direct", "zarr"):
        plain = zarr.open_array(str(tmp_path / f"t.zarr/units/{name}/latents"), mode="r")
        assert np.array_equal(plain[:], latents), name  # zarr decodes the index and checks its crc32c
        unit = TargetStore.open(tmp_path / "t.zarr").unit(name)
        assert unit._fast is not None
        for row in range(n):
            for k in range(K):
                assert np.array_equal(unit.read(row, k), latents[row, k])
        blocks = list(unit.blocks())  # whole shards: one read (cae2's files) or one per view (zarr's)
        assert [start for start, _, _ in blocks] == list(range(0, n, ROWS))
        assert np.array_equal(np.concatenate([b for _, b, _ in blocks]), latents), name
    markers = {name: TargetStore.open(tmp_path / "t.zarr").marker(name)["checksum"] for name in ("direct", "zarr")}
    assert markers["direct"] == markers["zarr"] and markers["direct"].startswith("crc32c:")


def test_a_shard_file_with_a_damaged_index_is_refused_by_zarr(tmp_path):
    latents = np.random.default_rng(0).standard_normal((ROWS, K, T, D)).astype(np.float16)
    store = TargetStore.create_or_validate(str(tmp_path / "t.zarr"), _meta())
    _write_unit(store, "u", latents, direct=True)
    path = tmp_path / "t.zarr/units/u/latents/c/0/0/0/0"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1  # last index byte: the crc32c no longer matches
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="(?i)checksum"):
        zarr.open_array(str(tmp_path / "t.zarr/units/u/latents"), mode="r")[:]


def test_checksum_kinds_and_old_markers_verify(tmp_path):
    data = np.arange(1000, dtype=np.float16).tobytes()
    crc = LatentsChecksum()
    crc.update(data[:300])
    crc.update(data[300:])
    whole = LatentsChecksum()
    whole.update(data)
    assert crc.value() == whole.value() and len(crc.value()) == len("crc32c:") + 8
    old = LatentsChecksum.like("blake2b-128:" + "0" * 32)
    old.update(data)
    assert old.value() == "blake2b-128:" + hashlib.blake2b(data, digest_size=16).hexdigest()
    with pytest.raises(ValueError, match="unknown latents checksum 'md5'"):
        LatentsChecksum.like("md5:abc")

    # A unit whose marker holds an older store's blake2b checksum verifies; a wrong or unknown one is reported.
    latents = np.random.default_rng(1).standard_normal((6, K, T, D)).astype(np.float16)
    store = TargetStore.create_or_validate(str(tmp_path / "t.zarr"), _meta())
    _write_unit(store, "u", latents, direct=True)
    group = zarr.open_group(str(tmp_path / "t.zarr/units/u"), mode="r+")
    marker = dict(group.attrs["complete"])
    for recorded, problem in [
        ("blake2b-128:" + hashlib.blake2b(latents.tobytes(), digest_size=16).hexdigest(), None),
        ("blake2b-128:" + "0" * 32, "latents checksum differs"),
        ("md5:0", "unknown latents checksum 'md5'"),
    ]:
        group.attrs["complete"] = {**marker, "checksum": recorded}
        problems = verify_store(str(tmp_path / "t.zarr")).problems
        view_problems = [p for p in problems if "checksum" in p]
        assert (view_problems == []) if problem is None else any(problem in p for p in view_problems), problems


def test_layout_not_written_by_cae2_falls_back_to_zarr(tmp_path):
    store = TargetStore.create_or_validate(str(tmp_path / "t.zarr"), _meta())
    _write_unit(store, "u", np.ones((ROWS, K, T, D), np.float16), direct=True)
    meta_path = Path(tmp_path / "t.zarr/units/u/latents/zarr.json")
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["index_location"] = "start"  # not the layout the direct path knows
    meta_path.write_text(json.dumps(meta))
    unit = TargetStore.open(tmp_path / "t.zarr").unit("u")
    assert unit._fast is None


def test_a_store_written_before_the_format_fields_reads_as_fp16_from_pillow_views(tmp_path):
    """Stores made before int8 latents and the device view path carry no latent_format, decoder or
    view_path: they read as fp16 stores of Pillow-decoded, Pillow-cut views, and reruns accept them."""
    path = tmp_path / "old.zarr"
    store = TargetStore.create_or_validate(str(path), _meta())
    _write_unit(store, "u", np.random.default_rng(0).standard_normal((5, K, T, D)).astype(np.float16), direct=True)
    doc = json.loads((path / "zarr.json").read_text())
    for key in ("latent_format", "decoder", "view_path"):
        del doc["attributes"]["cae2"][key]
    (path / "zarr.json").write_text(json.dumps(doc))
    old = TargetStore.open(path)
    assert (old.meta.latent_format, old.meta.decoder, old.meta.view_path) == ("fp16", "pillow", "pillow")
    assert not old.meta.differences(_meta())
    TargetStore.check_settings(str(path), _meta())  # a rerun with today's defaults is accepted
    unit = old.unit("u")
    assert unit.scales is None and unit.read_stored(0, 0)[1] is None and unit.read(0, 0).dtype == np.float16
