"""The training toolkit (flash_plugin.utils.training): seeded batches, resume, JSONL log, progress,
time budget, DDP helpers in one process; and the names that moved out of severity/train.py."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from flash_plugin.errors import CheckpointError, FlashInputError
from flash_plugin.utils.training import (
    Distributed,
    JsonlLog,
    SeededBatches,
    TimeBudget,
    TrainingRun,
    changed_fields,
    distributed,
    finite_or_none,
    frozen,
    progress_bar,
    step_generator,
)


# ----------------------------------------------------------------------------------------------
# Seeded batches
# ----------------------------------------------------------------------------------------------
def test_a_batch_depends_only_on_seed_and_step():
    a, b = SeededBatches(10, 4, seed=3), SeededBatches(10, 4, seed=3)
    seen = [a.indices(s) for s in range(7)]
    assert torch.equal(b.indices(5), seen[5])  # a fresh sampler (a resumed run) starts anywhere
    assert not torch.equal(SeededBatches(10, 4, seed=4).indices(0), seen[0])
    # the passes form one stream of permutations: 5 batches of 4 = 2 whole passes over 10 images
    stream = torch.cat(seen[:5])
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))


def test_drop_last_reads_whole_batches_per_epoch_from_the_given_permutation_seeds():
    n, bs, seed = 11, 4, 2
    batches = SeededBatches(n, bs, seed, drop_last=True, permutation_seed=lambda e: seed * 1000 + e)
    assert batches.steps_per_pass == 2
    for step in range(7):
        epoch, pos = divmod(step, 2)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        assert torch.equal(batches.indices(step), perm[pos * bs : (pos + 1) * bs])


@pytest.mark.parametrize("kwargs", [dict(n=0, batch_size=4), dict(n=3, batch_size=4, drop_last=True), dict(n=3, batch_size=0)])
def test_impossible_batches_are_refused(kwargs):
    with pytest.raises(FlashInputError):
        SeededBatches(seed=0, **kwargs)


def test_step_generator_draws_per_step():
    a = torch.rand(3, generator=step_generator(0, "train", 5))
    assert torch.equal(a, torch.rand(3, generator=step_generator(0, "train", 5)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(0, "train", 6)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(0, "noise", 5)))


# ----------------------------------------------------------------------------------------------
# A tiny loop on the toolkit: killed after a checkpoint, resumed, equal to an uninterrupted run
# ----------------------------------------------------------------------------------------------
_X = torch.randn(13, 3, generator=torch.Generator().manual_seed(0))
_Y = _X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3


def _tiny_run(out, steps, stop_after=None, ckpt_every=3):
    """Linear regression with a noisy target: returns (weights, the batches it saw)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    run = TrainingRun(out, model=model, optimizer=opt)
    batches = SeededBatches(len(_X), 4, seed=1)
    step = run.resume()[0] if run.has_state() else 0
    seen = []
    while step < steps:
        idx = batches.indices(step)
        noise = 0.01 * torch.randn(4, generator=step_generator(1, "noise", step))
        loss = (model(_X[idx]).squeeze(1) - _Y[idx] - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen.append((step, idx.tolist()))
        run.log.append({"step": step, "loss": loss.item(), "nan": float("nan")})
        if step % ckpt_every == 0:
            run.save(step, meta={"note": "tiny"})
        if step == stop_after:
            return None, seen  # "killed": the steps after the last checkpoint are lost
    run.save(step)
    return {k: v.clone() for k, v in model.state_dict().items()}, seen


def test_resume_sees_the_same_batches_and_reaches_the_same_weights(tmp_path):
    full_w, full_seen = _tiny_run(tmp_path / "full", 10)
    _, first = _tiny_run(tmp_path / "cut", 10, stop_after=5)
    assert first == full_seen[:5]
    run = TrainingRun(tmp_path / "cut", model=torch.nn.Linear(3, 1), optimizer=None)
    assert [r["step"] for r in run.log.read()] == [1, 2, 3, 4, 5]  # the last checkpoint is step 3
    resumed_w, second = _tiny_run(tmp_path / "cut", 10)
    assert [s for s, _ in second] == list(range(4, 11))
    assert second == full_seen[3:]  # the batches after the resume are the uninterrupted run's
    assert all(torch.equal(resumed_w[k], full_w[k]) for k in full_w)
    log = run.log.read()
    assert [r["step"] for r in log] == list(range(1, 11))  # cut back to step 3, then continued
    assert all(r["nan"] is None for r in log)  # strict JSON


def test_training_run_round_trip_with_ema_and_a_refused_resume(tmp_path):
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    run = TrainingRun(tmp_path, model=model, optimizer=opt, ema=ema)
    assert not run.has_state()
    run.save(7, meta={"config": {"lr": 0.1}})
    run.log.append({"step": 9})
    model2, ema2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    run2 = TrainingRun(tmp_path, model=model2, optimizer=opt2, ema=ema2)

    def refuse(meta):
        if changed_fields(meta["config"], {"lr": 0.2}, ["lr", "seed"]) == ["lr"]:
            raise CheckpointError("lr changed")

    with pytest.raises(CheckpointError, match="lr"):
        run2.resume(check=refuse)
    assert [r["step"] for r in run2.log.read()] == [9]  # a refused resume leaves the log alone
    step, meta = run2.resume()
    assert step == 7 and meta == {"config": {"lr": 0.1}} and run2.log.read() == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# ----------------------------------------------------------------------------------------------
# Log, progress, clock, freezing, DDP helpers (one process)
# ----------------------------------------------------------------------------------------------
def test_jsonl_log_lines(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.append({"step": 1, "loss": 0.5, "parts": [1.0, float("inf")], "nested": {"x": float("nan")}})
    log.append({"step": 2, "loss": 0.25})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 0.5, "parts": [1.0, None], "nested": {"x": None}},
                                                    {"step": 2, "loss": 0.25}]
    assert all("NaN" not in line and "Infinity" not in line for line in lines)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a half-written last line (a killed process)
    log.truncate(1)
    assert log.read() == [{"step": 1, "loss": 0.5, "parts": [1.0, None], "nested": {"x": None}}]
    JsonlLog(tmp_path / "log.jsonl", enabled=False).append({"step": 5})  # another DDP rank: no write
    JsonlLog(tmp_path / "log.jsonl", enabled=False).clear()
    assert len(log.read()) == 1
    log.clear()
    assert not (tmp_path / "log.jsonl").exists() and log.read() == []
    assert finite_or_none((1.0, float("-inf"), "a")) == [1.0, None, "a"]


def test_progress_bar_counts_from_the_resumed_step():
    bar = progress_bar(10, "test", initial=4)
    bar.update(2)
    assert bar.n == 6 and bar.total == 10
    bar.close()
    off = progress_bar(10, "test", enabled=False)
    off.update(1), off.set_postfix(loss="1"), off.close()  # a no-op object


def test_time_budget():
    assert not TimeBudget(None).exceeded() and not TimeBudget(math.inf).exceeded()
    b = TimeBudget(0)
    while b.elapsed_s <= 0:
        pass
    assert b.exceeded()


def test_frozen_restores_requires_grad():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    m[1].weight.requires_grad_(False)
    with frozen(m):
        assert not any(p.requires_grad for p in m.parameters())
    assert [p.requires_grad for p in m.parameters()] == [True, True, False, True]


def test_distributed_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with distributed("cpu") as (dist, device):
        assert dist == Distributed() and device == torch.device("cpu")
        assert dist.is_main and not dist.enabled and dist.rank0_flag(True) and dist.shard(6) == slice(0, 6)
        m = torch.nn.Linear(1, 1)
        assert dist.wrap(m, device) is m
        dist.barrier()
    assert Distributed(world_size=3, rank=1).shard(6) == slice(2, 4)
    with pytest.raises(FlashInputError, match="divisible by the number of processes 3"):
        Distributed(world_size=3, rank=0).shard(4)


# ----------------------------------------------------------------------------------------------
# Names that moved out of flash_plugin.severity.train
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old, module, new", [
    ("pearson", "flash_plugin.metrics", "pearson"),
    ("spearman", "flash_plugin.metrics", "spearman"),
    ("_ranks", "flash_plugin.metrics", "_ranks"),
    ("finite_or_none", "flash_plugin.utils.training", "finite_or_none"),
    ("BatchSampler", "flash_plugin.utils.training", "SeededBatches"),
    ("stream_generator", "flash_plugin.utils.random", "stream_generator"),
    ("stream_seed", "flash_plugin.utils.random", "stream_seed"),
])
def test_moved_names_still_work_with_a_deprecation_warning(old, module, new):
    train = importlib.import_module("flash_plugin.severity.train")
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{new}"):
        obj = getattr(train, old)
    assert obj is getattr(importlib.import_module(module), new)
    with pytest.raises(AttributeError):
        train.no_such_name  # noqa: B018
