"""The recorded image decoder: which JPEGs a device decoder takes, a stage-1 store made with the device
decoder (torchvision's libjpeg-turbo on these CPU tensors; nvJPEG on a GPU) against one made with Pillow,
the host fallback recorded per image, and stage 2 decoding as the store did."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cae2.errors import UserError
from pipelines.shards import make_shards
from targets.decoders import decode_all, decode_on_device, device_decodable, resolve_decoder
from targets.store import TargetStore
from targets.views import DecodeError, decode_image
from tests.fixtures import TINY_TEACHER, cli, synthetic_image, write_bad_images, write_good_images


def _jpeg(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _awkward_jpegs(rng) -> dict[str, tuple[bytes, str | None]]:
    """{name: (file, why a device decoder does not take it or None)}."""
    rgb = synthetic_image(rng, 101, 77)
    full = _jpeg(synthetic_image(rng, 120, 160))
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    return {
        "s420": (_jpeg(rgb, subsampling=2), None),
        "s422": (_jpeg(rgb, subsampling=1), None),
        "s444": (_jpeg(rgb, subsampling=0, quality=97), None),
        "one_pixel": (_jpeg(synthetic_image(rng, 1, 1)), None),
        "gray": (_jpeg(rgb[..., 0]), "grayscale JPEG"),
        "cmyk": (cmyk.getvalue(), "CMYK JPEG"),
        "progressive": (_jpeg(rgb, progressive=True), "progressive JPEG"),
        "png_named_jpg": (png.getvalue(), "not a JPEG"),
        "cut_short": (full[:len(full) // 2], "no end marker (cut short?)"),
        "empty": (b"", "not a JPEG"),
        # a header the device decoder takes, data it does not (an unknown marker inside the scan)
        "bad_scan": (full[:700] + b"\xff\xc8\x00\x04\x00\x00" + full[700:], None),
    }


def test_the_device_decoder_takes_plain_jpegs_and_reads_their_size_from_the_header():
    for name, (data, reason) in _awkward_jpegs(np.random.default_rng(0)).items():
        info = device_decodable(data)
        assert info.host_reason == reason, name
        if reason is None:
            image = Image.open(io.BytesIO(data))
            assert (info.height, info.width) == (image.height, image.width), name


def test_torchvision_decodes_the_pixels_pillow_does_and_names_a_failure():
    """The claim behind SAME_PIXELS: libjpeg-turbo through torchvision and through Pillow agree exactly."""
    rng = np.random.default_rng(1)
    files = {name: data for name, (data, reason) in _awkward_jpegs(rng).items() if reason is None}
    files |= {f"q{q}_{h}x{w}": _jpeg(synthetic_image(rng, h, w), quality=q)
              for q, (h, w) in zip((50, 75, 95), ((33, 257), (480, 641), (17, 9)), strict=True)}
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in files.values()]
    with pytest.raises(RuntimeError):  # one bad file fails a batch ...
        decode_on_device(tensors, "cpu")
    decoded = decode_all(tensors, "cpu")  # ... which is then decoded file by file
    for (name, data), image in zip(files.items(), decoded, strict=True):
        if name == "bad_scan":
            assert isinstance(image, str) and image.startswith("torchvision failed: ") and ".cpp" not in image
            continue
        assert torch.equal(image, torch.from_numpy(np.asarray(decode_image(data)))), name


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same shards extracted with Pillow (Pillow view path) and with the device decoder (device view path)."""
    root = tmp_path_factory.mktemp("decoders")
    images = root / "images"
    write_good_images(images, 9)
    write_bad_images(images)
    for name, (data, _) in _awkward_jpegs(np.random.default_rng(2)).items():
        (images / f"awkward_{name}.jpg").write_bytes(data)
    make_shards(images, root / "shards", samples_per_shard=7)
    outputs = {}
    runs = (("host", ["--view-path", "pillow"]), ("device", ["--view-path", "device", "--decoder", "device"]))
    for name, extra in runs:
        res = cli("extract-targets", "--shards", str(root / "shards"), "--out", str(root / f"{name}.zarr"),
                   "--teacher", TINY_TEACHER, "--pretrained", "none", "--views", "2", "--workers", "0",
                   "--batch-size", "8", "--no-progress", *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        outputs[name] = res.stdout
    return root, outputs


def test_a_device_decoder_store_equals_the_pillow_store_and_records_the_host_decoded_rows(stores):
    root, outputs = stores
    host, device = TargetStore.open(root / "host.zarr"), TargetStore.open(root / "device.zarr")
    assert (host.meta.decoder, device.meta.decoder) == ("pillow", "torchvision")
    recorded = {}
    for name in host.unit_names():
        a, b = host.unit(name), device.unit(name)
        assert a.keys == b.keys and a.marker["skipped"] == b.marker["skipped"]
        for field in ("valid", "view_int", "view_float", "image_hw"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (name, field)
        assert np.array_equal(a.latents[:], b.latents[:]), name
        assert "decoded_on_host" not in a.marker
        recorded |= {b.keys[d["row"]].split("_", 1)[1]: d["reason"] for d in b.marker.get("decoded_on_host", [])}
        assert b.host_rows == {d["row"] for d in b.marker.get("decoded_on_host", [])}
    # every image the device decoder did not take and Pillow could read, with the reason; skipped ones are not
    assert recorded == {"awkward_gray": "grayscale JPEG", "awkward_cmyk": "CMYK JPEG", "cmyk": "CMYK JPEG",
                        "awkward_progressive": "progressive JPEG", "awkward_png_named_jpg": "not a JPEG",
                        "png_named": "not a JPEG"}
    assert outputs["host"].splitlines()[1] == outputs["device"].splitlines()[1]  # images, views, skips


def test_a_second_run_with_another_decoder_is_refused(stores):
    root, _ = stores
    res = cli("extract-targets", "--shards", str(root / "shards"), "--out", str(root / "device.zarr"), "--teacher",
               TINY_TEACHER, "--pretrained", "none", "--views", "2", "--workers", "0", "--view-path", "device")
    assert res.returncode == 2 and "decoder: store has 'torchvision', this run 'pillow'" in res.stderr, res.stderr
    res = cli("extract-targets", "--shards", str(root / "shards"), "--out", str(root / "new.zarr"), "--teacher",
               TINY_TEACHER, "--pretrained", "none", "--views", "2", "--view-path", "pillow", "--decoder", "device")
    assert res.returncode == 2 and "--decoder device" in res.stderr and "--view-path device" in res.stderr


def test_stage_2_decodes_as_the_store_did_and_trains_the_same(stores):
    root, _ = stores
    losses = {}
    for decoder in ("store", "host"):
        out = root / f"run_{decoder}"
        res = cli("pretrain", "--shards", str(root / "shards"), "--targets", str(root / "device.zarr"), "--model",
                   "cae2_debug", "--out", str(out), "--steps", "3", "--batch-size", "6", "--workers", "2",
                   "--log-every", "1", "--warmup-steps", "1", "--lr", "2e-3", "--allow-random-teacher",
                   "--view-path", "device", "--decoder", decoder, "--no-progress")
        assert res.returncode == 0, res.stderr[-2000:]
        said = "this run decodes with torchvision on the device" if decoder == "store" else "decodes with pillow"
        assert said in res.stderr and "WARNING" not in res.stderr
        losses[decoder] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["store"]) == 3 and losses["store"] == losses["host"]
    res = cli("verify-targets", str(root / "device.zarr"), "--shards", str(root / "shards"), "--recompute", "8",
               "--pretrained", "none")
    assert res.returncode == 0 and "min cosine 1.000000" in res.stdout and "verify: OK" in res.stdout, res.stdout


def test_crossing_to_other_pixels_is_refused_unless_asked_and_then_said():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    use = resolve_decoder("store", "pillow", cpu, "device")
    assert resolve_decoder("store", "pillow", cuda, "device") == use
    assert (use.name, use.on_device, use.crossing) == ("pillow", False, None)
    use = resolve_decoder("store", "nvjpeg", cuda, "device")
    assert (use.name, use.on_device, use.crossing) == ("nvjpeg", True, None)
    use = resolve_decoder("store", "torchvision", cpu, "pillow")  # the same pixels on the host
    assert (use.name, use.on_device, use.crossing) == ("pillow", False, None)
    for device, view_path in ((cpu, "device"), (cuda, "pillow")):
        with pytest.raises(UserError, match="--decoder host"):
            resolve_decoder("store", "nvjpeg", device, view_path)
    use = resolve_decoder("host", "nvjpeg", cpu, "device")
    assert not use.on_device and "differ slightly" in use.crossing
    use = resolve_decoder("device", "pillow", cuda, "device")
    assert use.name == "nvjpeg" and "differ slightly" in use.crossing
    assert resolve_decoder("device", "pillow", cpu, "device").crossing is None
    with pytest.raises(UserError, match="--view-path device"):
        resolve_decoder("device", "pillow", cpu, "pillow")


def test_convert_keeps_the_decoder_and_the_host_decoded_rows(stores):
    root, _ = stores
    res = cli("convert-targets", str(root / "device.zarr"), str(root / "int8.zarr"), "--latent-format", "int8")
    assert res.returncode == 0, res.stderr[-2000:]
    source, converted = TargetStore.open(root / "device.zarr"), TargetStore.open(root / "int8.zarr")
    assert converted.meta.decoder == "torchvision"
    for name in source.unit_names():
        assert converted.unit(name).host_rows == source.unit(name).host_rows
    assert any(converted.unit(name).host_rows for name in converted.unit_names())


def test_every_pillow_mode_decodes_exactly_or_is_refused_with_its_reason():
    ramp = (np.arange(48 * 64, dtype=np.int64).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    png16 = io.BytesIO()
    Image.fromarray(ramp).save(png16, format="PNG")
    assert Image.open(io.BytesIO(png16.getvalue())).mode == "I;16"
    got = np.asarray(decode_image(png16.getvalue()))
    want = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert (got == want[..., None]).all()  # not white: round(v * 255 / 65535) in every channel
    tiff = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tiff, format="TIFF")
    with pytest.raises(DecodeError, match="floating-point image"):
        decode_image(tiff.getvalue())
    palette = Image.fromarray(synthetic_image(np.random.default_rng(0), 32, 32)).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert (np.asarray(decode_image(buf.getvalue())) == np.asarray(palette.convert("RGB"))).all()


def test_exif_orientation_is_not_applied_in_any_stage():
    arr = synthetic_image(np.random.default_rng(1), 40, 64)
    plain = _jpeg(arr, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    rotated = _jpeg(arr, quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(rotated)).getexif()[0x0112] == 6
    host = np.asarray(decode_image(rotated))
    assert host.shape == (40, 64, 3) and (host == np.asarray(decode_image(plain))).all()
    device = decode_on_device([torch.frombuffer(bytearray(rotated), dtype=torch.uint8)], torch.device("cpu"))[0]
    assert tuple(device.shape[:2]) == (40, 64)
