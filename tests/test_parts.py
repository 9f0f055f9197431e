"""Unit tests of the parts of both stages that the end-to-end runs exercise only as a whole: the
schedule, one optimizer step, checkpoints, the epoch plan, the shuffle, the resume arithmetic of the
loader workers and the unit assembler. Each runs in seconds."""

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import cae2
from cae2.errors import UserError
from pipelines.checkpoint import MARKER, Checkpointer, complete_checkpoints, prune, resolve_resume
from pipelines.extract.assemble import UnitAssembler
from pipelines.pretrain.config import TrainConfig
from pipelines.pretrain.data import ShardIndex, StreamConfig, _shuffled, plan_epoch, resume_position
from pipelines.pretrain.schedule import Schedule, lr_at
from pipelines.pretrain.step import StepParts, make_optimizer, train_step
from pipelines.shards import Shard
from targets.store import TargetStore
from targets.store_meta import StoreMeta


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(shards="s", targets="t", **kw)


def test_schedule_takes_the_preset_and_the_options():
    preset = cae2.get_preset("cae2_vit_base").train
    s = Schedule.resolve(_cfg(batch_size=64, epochs=2), preset, batches_per_rank=100, world=4)
    assert (s.global_batch, s.steps_per_epoch, s.total_steps) == (256, 100, 200)
    assert s.warmup_steps == 200  # preset warmup (10 epochs) clamped to the run
    assert s.peak_lr == pytest.approx(preset.lr * 256 / preset.lr_batch_ref) and s.lr_rule.startswith("linear")
    assert (s.clip_grad, s.weight_decay, s.min_lr) == (preset.clip_grad, preset.weight_decay, preset.min_lr)
    t = Schedule.resolve(_cfg(batch_size=8, grad_accum=4, steps=50, warmup_steps=5, lr=1e-3, clip_grad=1.0,
                              weight_decay=0.0), preset, batches_per_rank=40, world=1)
    assert (t.steps_per_epoch, t.total_steps, t.warmup_steps, t.peak_lr, t.clip_grad, t.weight_decay) == \
        (10, 50, 5, 1e-3, 1.0, 0.0)
    assert t.to_json()["global_batch"] == 32 and t.to_json()["loss"] == "cosine"
    with pytest.raises(UserError, match="grad-accum 4"):
        Schedule.resolve(_cfg(grad_accum=4), preset, batches_per_rank=3, world=1)


def test_lr_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(120)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[119] == pytest.approx(0.1)
    assert lr_at(0, 1.0, 0.0, 0, 1) == pytest.approx(1.0)


def test_train_step_accumulates_like_one_large_batch():
    from accelerate import Accelerator

    model_cfg = cae2.resolve_model_config("cae2_debug")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    mask = torch.from_numpy(np.stack([cae2.create_mask_generator(model_cfg)(np.random.default_rng(i))
                                      for i in range(4)]))
    targets = torch.randn(4, 1 + model_cfg.num_patches, model_cfg.target_dim).half()
    preset = cae2.get_preset("cae2_debug").train
    results = []
    for accum in (1, 2):
        sched = Schedule.resolve(_cfg(batch_size=4 // accum, grad_accum=accum, steps=3, warmup_steps=2, lr=1e-2,
                                      drop_path=0.0), preset, batches_per_rank=10, world=1)
        acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        torch.manual_seed(1)
        model = cae2.CAEv2(replace(model_cfg, drop_path=0.0))
        opt = make_optimizer(model, preset, 0.05, sched.peak_lr)
        model, opt = acc.prepare(model, opt)
        parts = StepParts(accelerator=acc, model=model, forward=model, optimizer=opt, schedule=sched,
                          n_visible=model_cfg.num_visible_tokens)
        n = 4 // accum
        batches = iter([{"images": images[i:i + n], "mask": mask[i:i + n], "targets": targets[i:i + n],
                         "keys": [f"k{j}" for j in range(i, i + n)]} for i in range(0, 4, n)])
        stats = train_step(parts, batches, step=0, epoch=0)
        assert stats.lr == pytest.approx(sched.lr(0)) and stats.wait >= 0 and math.isfinite(float(stats.grad_norm))
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (a, wa), (b, wb) = results
    assert torch.allclose(a.losses, b.losses, atol=1e-5) and float(a.grad_norm) == pytest.approx(float(b.grad_norm),
                                                                                                    rel=1e-4)
    diff = torch.cat([(x - y).abs().flatten() for x, y in zip(wa, wb, strict=True)])
    # Adam's first update is ~lr x sign(g): gradients that round to either side of 0 may step apart
    assert diff.max() <= 2 * 1e-2 + 1e-6 and (diff <= 1e-6).float().mean() > 0.99


def _fake_checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(f'{{"step": {step}}}')
    if complete:
        (d / MARKER).write_text(f"step {step}\n")
    return d


def test_checkpoints_resume_resolution_and_retention(tmp_path):
    run = tmp_path / "run"
    ckpt = Checkpointer(run, save_every=5, keep_last=2)
    assert ckpt.find(None) == (None, None) and ckpt.find("latest") == (None, None)
    for step in (5, 10, 15):
        _fake_checkpoint(run, step)
    partial = _fake_checkpoint(run, 20, complete=False)
    with pytest.raises(UserError, match="already holds checkpoints"):
        ckpt.find(None)
    found, state = ckpt.find("latest")
    assert found.name == "step_00000015" and state == {"step": 15}
    assert resolve_resume(str(run), run).name == "step_00000015"  # a run dir: its newest complete checkpoint
    with pytest.raises(UserError, match="incomplete"):
        resolve_resume(str(partial), run)
    with pytest.raises(UserError, match="no such checkpoint"):
        resolve_resume(str(run / "nope"), run)
    assert [ckpt.should_save(s, 12, False) for s in (4, 5, 10, 12)] == [False, True, True, True]
    assert ckpt.should_save(7, 12, True)
    prune(run, keep=2)
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000010", "step_00000015"]
    assert not partial.exists()
    prune(run, keep=0)  # never the newest complete one
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000015"]


def test_a_refused_torch_save_names_the_file_and_the_errno(tmp_path):
    """torch.save reports a full disk or EIO as "iostream error" / "unexpected pos"; checkpoints and
    feature caches say which file and why."""
    import errno

    import torch

    from pipelines.files import save_torch

    with pytest.raises(OSError) as caught:
        save_torch({"x": torch.zeros(4096)}, "/dev/full")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"
    save_torch({"x": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(torch.load(tmp_path / "ok.pt")["x"], torch.arange(3))


def _index(counts: list[int]) -> list[ShardIndex]:
    return [ShardIndex(Shard(f"u{i}.tar", f"u{i}.tar"), np.arange(n), n) for i, n in enumerate(counts)]


@pytest.mark.parametrize(("world", "workers", "batch"), [(1, 1, 4), (2, 3, 4), (3, 2, 5), (4, 4, 1)])
def test_epoch_plan_is_equal_per_rank_and_never_repeats_a_sample(world, workers, batch):
    index = _index([7, 0, 13, 5, 9, 11])
    seen, steps = [], set()
    for rank in range(world):
        plan = plan_epoch(index, StreamConfig(batch_size=batch, seed=3, rank=rank, world=world, workers=workers), 2)
        assert sum(plan.worker_batches) == plan.batches_per_rank and len(plan.worker_segments) == workers
        assert max(plan.worker_batches) - min(plan.worker_batches) <= 1
        for segments, nb in zip(plan.worker_segments, plan.worker_batches, strict=True):
            rows = [(s.name, int(r)) for s, rs in segments for r in rs]
            assert len(rows) == nb * batch
            seen += rows
        steps.add(plan.batches_per_rank)
        assert plan.left_out < world * batch
    assert len(steps) == 1 and len(seen) == len(set(seen)) == 45 - plan.left_out
    again = plan_epoch(index, StreamConfig(batch_size=batch, seed=3, rank=0, world=world, workers=workers), 2)
    other = plan_epoch(index, StreamConfig(batch_size=batch, seed=3, rank=0, world=world, workers=workers), 3)
    assert again.worker_segments[0][0][0] == plan_epoch(index, StreamConfig(
        batch_size=batch, seed=3, rank=0, world=world, workers=workers), 2).worker_segments[0][0][0]
    assert [s.name for s, _ in again.worker_segments[0]] != [s.name for s, _ in other.worker_segments[0]] or \
        workers > 1
    with pytest.raises(UserError, match="fewer than ranks x batch"):
        plan_epoch(_index([3]), StreamConfig(batch_size=4, seed=0), 0)


def test_shuffle_buffer_is_a_deterministic_permutation():
    items = list(range(50))
    a = list(_shuffled(items, 8, np.random.default_rng(1)))
    assert sorted(a) == items and a != items and a == list(_shuffled(items, 8, np.random.default_rng(1)))
    assert list(_shuffled(items, 1, np.random.default_rng(1))) == items
    assert max(i - pos for pos, i in enumerate(a)) <= 8  # an item leaves at most a buffer's length late... early
    assert list(_shuffled([], 8, np.random.default_rng(0))) == []


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_resumed_workers_continue_the_round_robin_exactly(workers):
    """Micro-batch j comes from logical worker j % W (the j // W-th batch it makes). After a resume at s,
    loader worker i must make exactly the batches an uninterrupted run makes from s on."""
    for s in range(0, 17):
        resumed = []
        queues = {}
        for i in range(workers):
            wid, skip = resume_position(i, workers, s)
            queues[i] = iter(range(skip, 100))
            queues[i] = (wid, queues[i])
        for j in range(12):  # the loader polls worker j % W for the j-th batch after the resume
            wid, it = queues[j % workers]
            resumed.append((wid, next(it)))
        uninterrupted = [(j % workers, j // workers) for j in range(s, s + 12)]
        assert resumed == uninterrupted, (workers, s)


def _meta(rows_per_shard: int, fmt: str = "fp16") -> StoreMeta:
    return StoreMeta(teacher={"name": "t"}, views={}, seed=0, views_per_image=2, input_size=8, grid=(2, 2),
                     num_tokens=5, latent_dim=3, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic",
                     images_per_shard=rows_per_shard, latent_format=fmt)


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_unit_assembler_hands_out_whole_shards_in_row_order(tmp_path, fmt):
    meta = _meta(3, fmt)
    store = TargetStore.create_or_validate(str(tmp_path / "s.zarr"), meta)
    writer = store.begin_unit("u.tar", "u.tar", [f"k{i}" for i in range(7)])
    asm = UnitAssembler(writer, "u.tar", meta)
    dtype = np.int8 if fmt == "int8" else np.float16
    rows = {r: np.full((2, 5, 3), r + 1, dtype) for r in range(7)}
    ready = []
    for r in (2, 0, 5, 1, 6, 3):  # row 4 skipped, out of order
        ready += asm.put(r, rows[r], np.full((2, 5), r, np.float32) if fmt == "int8" else None)
        assert not asm.done
    assert [start for start, _, _ in ready] == [0]  # rows 0-2; 3-5 wait for row 4
    ready += asm.put(4, None)
    assert asm.done and [(start, len(b)) for start, b, _ in ready] == [(0, 3), (3, 3), (6, 1)]
    block = ready[1][1]
    assert block.dtype == dtype and (block[0] == 4).all() and (block[1] == 0).all() and (block[2] == 6).all()
    assert (ready[1][2] is None) == (fmt == "fp16")


def test_checkpoint_parts_round_trip_with_every_generator_and_a_further_part(tmp_path):
    """Model (wrapper prefixes dropped), optimizer, a further part and the generators come back exactly;
    the files are written through Python files (no patched torch.save)."""
    import random

    from accelerate import Accelerator
    from timm.utils import ModelEmaV3

    from pipelines.checkpoint import CheckpointParts, load_parts, save_parts

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ema = ModelEmaV3(model, decay=0.5)
    parts = CheckpointParts(model=model, optimizer=opt, extra={"ema": ema})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_torch_calls = torch.save
    save_parts(acc, ckpt, parts)
    assert torch.save is save_torch_calls
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.bin", "model.safetensors", "optimizer.bin",
                                                      "random_states_0.pkl"]
    after = (random.random(), np.random.rand(), torch.rand(1))  # what the generators give next

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    ema2 = ModelEmaV3(model2, decay=0.5)
    load_parts(acc, ckpt, CheckpointParts(model=model2, optimizer=opt2, extra={"ema": ema2}))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(),
                                                 strict=True))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ema2.state_dict().values(), strict=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == after
