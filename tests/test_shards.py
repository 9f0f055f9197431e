"""Shard specs, make-shards inputs, and a teacher given as an open_clip config file."""

import json
import shutil
from pathlib import Path

import pytest

from cae2.errors import UserError
from pipelines.extract.config import ExtractConfig
from pipelines.extract.run import run_extract
from pipelines.shards import expand_shards, iter_shard, make_shards
from targets.store import TargetStore
from targets.teacher import BUNDLED_CONFIGS, TeacherSpec
from tests.fixtures import write_good_images


@pytest.fixture()
def shard_dir(tmp_path):
    write_good_images(tmp_path / "flat", 7)
    make_shards(tmp_path / "flat", tmp_path / "shards", samples_per_shard=2)  # 4 shards
    return tmp_path / "shards"


def test_every_spec_form_resolves_to_the_same_shards(shard_dir, tmp_path):
    names = [f"shard-{i:06d}.tar" for i in range(4)]
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\n" + "\n".join(str(shard_dir / n) for n in names) + "\n")
    for spec in (str(shard_dir), str(shard_dir / "shard-{000000..000003}.tar"), str(shard_dir / "shard-*.tar"),
                 str(listing)):
        assert [s.name for s in expand_shards(spec)] == names, spec


def test_spec_errors_name_the_problem(shard_dir, tmp_path):
    with pytest.raises(UserError, match=r"shard-000004.tar does not exist \(and 5 more\)"):
        expand_shards(str(shard_dir / "shard-{000000..000009}.tar"))
    with pytest.raises(UserError, match="matches no files"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "copy").mkdir()
    shutil.copy(shard_dir / "shard-000000.tar", tmp_path / "copy" / "shard-000000.tar")
    both = tmp_path / "both.txt"
    both.write_text(f"{shard_dir / 'shard-000000.tar'}\n{tmp_path / 'copy' / 'shard-000000.tar'}\n")
    with pytest.raises(UserError, match="share the file name shard-000000.tar"):
        expand_shards(str(both))


def test_make_shards_from_a_flat_folder_and_a_list_file(shard_dir, tmp_path):
    samples = [s for sh in expand_shards(str(shard_dir)) for s in iter_shard(sh.url)]
    assert len(samples) == 7 and all(s["cls"] == b"-1" for s in samples)
    paths = sorted((tmp_path / "flat").glob("*.jpg"), reverse=True)
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(str(p) for p in paths))
    make_shards(listing, tmp_path / "from_list", samples_per_shard=10)
    listed = [s for sh in expand_shards(str(tmp_path / "from_list")) for s in iter_shard(sh.url)]
    assert [json.loads(s["json"])["path"] for s in listed] == [str(p) for p in paths]  # the list's order
    with pytest.raises(UserError, match="already holds"):
        make_shards(listing, tmp_path / "from_list")


def test_teacher_from_a_config_json_file(shard_dir, tmp_path):
    config = tmp_path / "my-tiny-clip.json"
    config.write_text((BUNDLED_CONFIGS / "cae2-tiny-clip.json").read_text())
    out = tmp_path / "t.zarr"
    run_extract(ExtractConfig(shards=str(shard_dir), out=str(out), views_per_image=1, workers=0, progress=False,
                              teacher=TeacherSpec(name=str(config), pretrained="none")))
    teacher = TargetStore.open(out).meta.teacher
    assert teacher["name"] == "my-tiny-clip" and teacher["config"]["embed_dim"] == 32
    assert Path(out / "units" / "shard-000003.tar" / "keys").is_dir()


def test_quick_gelu_of_an_unknown_weights_file_must_be_stated(tmp_path):
    """A local file is recognised by its sha256 (OpenAI's releases are in open_clip's registry); a renamed
    or unknown file no longer gets QuickGELU from its name."""
    import open_clip
    import torch

    from cae2.errors import UserError
    from targets.teacher import BUNDLED_CONFIGS, Teacher, TeacherSpec, released_checkpoints

    open_clip.add_model_config(BUNDLED_CONFIGS / "cae2-tiny-clip.json")
    weights = tmp_path / "openai-renamed.pt"
    torch.save(open_clip.create_model("cae2-tiny-clip").state_dict(), weights)
    with pytest.raises(UserError, match="--quick-gelu for OpenAI-trained weights or --no-quick-gelu"):
        Teacher(TeacherSpec(name="cae2-tiny-clip", pretrained=str(weights)))
    for qg in (False, True):
        teacher = Teacher(TeacherSpec(name="cae2-tiny-clip", pretrained=str(weights), quick_gelu=qg))
        assert teacher.quick_gelu is qg and teacher.identity().weights_sha256
    known = released_checkpoints()
    openai = [v for v in known.values() if v[1] == "openai"]
    assert len(openai) >= 9 and all(qg for _, _, qg in openai) and all(len(k) == 64 for k in known)


def test_make_shards_leaves_out_its_own_outputs_and_refuses_empty_classes_and_itself(tmp_path, caplog):
    for cls in ("cat", "dog"):
        write_good_images(tmp_path / "imgs" / cls, 3, seed=len(cls))
    make_shards(tmp_path / "imgs", tmp_path / "imgs" / "_shards", samples_per_shard=10)
    with caplog.at_level("WARNING"):
        make_shards(tmp_path / "imgs", tmp_path / "imgs" / "_shards2", samples_per_shard=10)
    assert "left out _shards (shards made by make-shards, not a class)" in caplog.text
    for folder in ("_shards", "_shards2"):  # two classes in both: the first output folder did not become a class
        samples = list(iter_shard(str(tmp_path / "imgs" / folder / "shard-000000.tar")))
        assert sorted({int(s["cls"]) for s in samples}) == [0, 1] and len(samples) == 6
    (tmp_path / "imgs" / "empty").mkdir()
    with pytest.raises(UserError, match="class folder.s. empty hold no images"):
        make_shards(tmp_path / "imgs", tmp_path / "more")
    with pytest.raises(UserError, match="OUT_DIR .* is SOURCE"):
        make_shards(tmp_path / "flat", tmp_path / "flat")


@pytest.mark.slow
def test_make_shards_stopped_by_sigterm_says_so_and_its_half_set_is_refused_until_finished(tmp_path):
    import signal
    import subprocess
    import sys

    from tests.fixtures import ENV, ROOT, cli, hold_when, signal_job

    write_good_images(tmp_path / "imgs", 300, sizes=((64, 64),))
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "make-shards", str(tmp_path / "imgs"), str(out),
                             "--samples-per-shard", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT, start_new_session=True)
    assert hold_when(proc, lambda: len(list(out.glob("shard-*.tar"))) >= 3, slice_s=0.005)
    signal_job(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 143 and len(lines) == 1 and "make-shards stopped (SIGTERM) with" in lines[0], err
    assert "of 300 shards complete" in lines[0] and "rerun the same command" in lines[0]
    assert not list(out.glob("*.partial"))
    with pytest.raises(UserError, match="make-shards has not finished"):
        expand_shards(str(out))
    res = cli("extract-targets", "--shards", out, "--out", tmp_path / "t.zarr", "--teacher", "cae2-tiny-clip",
              "--pretrained", "none", "--workers", "0")
    assert res.returncode == 2 and "rerun `cae2 make-shards" in res.stderr
    assert cli("make-shards", tmp_path / "imgs", out, "--samples-per-shard", "1").returncode == 0
    assert len(expand_shards(str(out))) == 300
    (out / "shard-000007.tar").unlink()
    with pytest.raises(UserError, match="is missing 1 of the 300 shards"):
        expand_shards(str(out))


def test_a_shard_with_zero_members_is_a_complete_empty_unit(shard_dir, tmp_path):
    import tarfile

    from tests.fixtures import cli

    shards = tmp_path / "with_empty"
    shutil.copytree(shard_dir, shards)
    tarfile.open(shards / "empty.tar", "w").close()
    store = tmp_path / "t.zarr"
    for _ in range(2):  # a rerun finds it complete
        res = cli("extract-targets", "--shards", shards, "--out", store, "--views", "1", "--teacher", "cae2-tiny-clip",
                  "--pretrained", "none", "--workers", "0")
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "0 written, 5 already complete" in res.stdout
    assert TargetStore.open(store).is_complete("empty.tar")
    res = cli("verify-targets", store, "--shards", shards)
    assert res.returncode == 0 and "verify: OK" in res.stdout, res.stdout + res.stderr
    res = cli("pretrain", "--shards", shards, "--targets", store, "--model", "cae2_debug", "--out", tmp_path / "run",
              "--steps", "2", "--batch-size", "2", "--workers", "0", "--lr", "1e-3", "--allow-random-teacher")
    assert res.returncode == 0, res.stderr[-2000:]


def test_skip_reasons_print_whole_and_say_how_a_dotted_member_name_was_split(tmp_path):
    import io
    import tarfile

    from tests.fixtures import cli

    jpg = (write_good_images(tmp_path / "imgs", 1)[0]).read_bytes()
    tarball = tmp_path / "shards" / "dotted.tar"
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w") as tar:
        for name, data in (("hand_x.v2.jpg", jpg), ("good.jpg", jpg), ("text.jpg", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    res = cli("extract-targets", "--shards", tarball, "--out", tmp_path / "t.zarr", "--views", "1", "--teacher",
              "cae2-tiny-clip", "--pretrained", "none", "--workers", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if "skipped:" in x)
    assert "skipped: 2 (1 no image field (has: v2.jpg); member names are split at their first dot (KEY.v2.jpg is key " \
           "KEY with field v2.jpg): name members KEY.jpg" in line, line
    assert "1 undecodable image: UnidentifiedImageError: cannot identify image file <_io.BytesIO object>" in line, line
