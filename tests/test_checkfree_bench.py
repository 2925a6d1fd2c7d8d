"""The recovery benchmark's moving parts (benchmarks/recovery.py), on a few steps of the tiny model.

The benchmark's numbers are measured by running it; these tests check that what
it measures is what it claims: one failure schedule per rate, CheckFree+ swaps
on half the microbatches, and each method rebuilding a lost stage its own way.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
import torch
from bench_loader import load_benchmark

from lowband.node.train.data import Corpus

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("recovery")


@pytest.fixture(scope="module")
def corpus(bench: ModuleType) -> Corpus:
    return bench.load_corpus(seed=0, max_bytes=200_000)


def small(bench: ModuleType, **kw: object) -> Any:
    args = {"steps": 6, "eval_every": 3, "eval_batches": 1, "eval_batch_size": 2, "microbatch_size": 2,
            "seq_len": 16, "warmup_steps": 2}
    args.update(kw)
    return bench.Settings(**args)


def test_failure_schedule_is_seeded_poisson_over_block_stages(bench: ModuleType) -> None:
    a = bench.failure_schedule(10, 360_000, 4, seed=0)
    assert a == bench.failure_schedule(10, 360_000, 4, seed=0)
    assert a != bench.failure_schedule(10, 360_000, 4, seed=1)
    assert all(1 <= f.stage <= 3 for f in a)
    assert [f.time_s for f in a] == sorted(f.time_s for f in a)
    # 100 hours at 10/hour: about 1000 (Poisson sd ~32).
    assert 850 < len(a) < 1150
    assert bench.failure_schedule(0, 3600, 4, seed=0) == []


def test_checkfree_plus_swaps_half_the_microbatches(bench: ModuleType) -> None:
    four = bench.iteration_paths(4, 2, swap_edges=True)
    flat = [p for it in four for p in it]
    assert flat.count([0, 1, 2, 3, 0]) == 2
    assert [0, 2, 1, 3, 0] in flat and [0, 1, 3, 2, 0] in flat
    seven = bench.iteration_paths(7, 4, swap_edges=True)
    assert seven == [[[0, 1, 2, 3, 4, 5, 6, 0], [0, 2, 1, 3, 4, 6, 5, 0]] * 2]
    assert bench.iteration_paths(4, 2, swap_edges=False) == [[[0, 1, 2, 3, 0]] * 2]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("checkfree", ["checkfree", "random-reinit"]),
        ("checkfree_plus", ["checkfree", "checkfree-plus"]),
        ("checkpoint", ["checkpoint-rollback", "checkpoint-rollback"]),
        ("random_reinit", ["random-reinit", "random-reinit"]),
    ],
)
def test_each_method_recovers_its_own_way_and_keeps_training(bench: ModuleType, corpus: Corpus, method: str,
                                                             expected: list[str]) -> None:
    settings = small(bench)
    schedule = [bench.Failure(30.0, 2), bench.Failure(31.0, 1)]
    out = bench.Run(method, settings, schedule, corpus, save_every=2).run()
    assert [e["method"] for e in out["events"]] == expected
    assert all(math.isfinite(v) for _, _, v in out["curve"])
    # Every failure costs a join; transfers depend on the method (2 neighbours, 1 copy, 3 for weights+moments).
    units = {"checkfree": 2 + 0, "checkfree_plus": 2 + 1, "checkpoint": 3 + 3, "random_reinit": 0}[method]
    assert out["overhead_s"]["recoveries"] == pytest.approx(2 * settings.join_s + units * settings.weights_s)


def test_checkfree_rebuild_inside_the_run_is_the_gradient_weighted_average(bench: ModuleType, corpus: Corpus) -> None:
    run = bench.Run("checkfree", small(bench), [], corpus)
    run.step(0)
    run.norms[1], run.norms[3] = 1.0, 3.0
    s1 = {k: v.clone() for k, v in run.stages[1].state_dict().items()}
    s3 = {k: v.clone() for k, v in run.stages[3].state_dict().items()}
    how, units = run._recover(2)
    assert (how, units) == ("checkfree", 2.0)
    for name, value in run.stages[2].state_dict().items():
        torch.testing.assert_close(value, 0.75 * s3[name] + 0.25 * s1[name])
    assert all(g["lr_scale"] == pytest.approx(1.1) for g in run.opts[2].param_groups)


def test_checkpoint_rollback_restores_the_last_save(bench: ModuleType, corpus: Corpus) -> None:
    run = bench.Run("checkpoint", small(bench), [], corpus, save_every=100)
    saved = {k: v.clone() for k, v in run.stages[2].state_dict().items()}
    for step in range(2):
        run.step(step)
    assert any(not torch.equal(v, saved[k]) for k, v in run.stages[2].state_dict().items())
    run._recover(2)
    torch.testing.assert_close(run.stages[2].state_dict(), saved)


def test_target_and_time_to_target(bench: ModuleType) -> None:
    curve = [(10, 100.0, 3.0), (20, 200.0, 2.5), (30, 300.0, 2.4), (40, 400.0, 2.2)]
    assert bench.target_loss(curve, 40, 0.75) == 2.4
    assert bench.first_at_target(curve, 2.45) == (30, 300.0)
    assert bench.first_at_target(curve, 1.0) is None


def test_young_daly_checkpoint_interval(bench: ModuleType) -> None:
    s = bench.Settings(iter_s=10.0, weights_s=10.0, state_factor=3.0)
    # sqrt(2 * 30 s * 3600 s / 10) = 146.97 s -> 15 iterations of 10 s.
    assert s.checkpoint_interval(10) == 15
    assert bench.Settings(save_every=7).checkpoint_interval(10) == 7


def test_aggregate_and_sooner(bench: ModuleType) -> None:
    rows = [{"time_to_target_s": 100.0, "final_val_loss": 2.0, "failures": 1},
            {"time_to_target_s": 300.0, "final_val_loss": 3.0, "failures": 2}]
    agg = bench.aggregate(rows)
    assert agg["time_to_target_s"] == 200.0 and agg["final_val_loss"] == 2.5 and agg["reached"] == 2
    assert bench.aggregate([*rows, {"time_to_target_s": None, "final_val_loss": 1.0, "failures": 0}])[
        "time_to_target_s"] is None
    by = {"checkfree_plus": {"time_to_target_s": 80.0}, "checkpoint": {"time_to_target_s": 100.0},
          "random_reinit": {"time_to_target_s": None}}
    assert bench.sooner(by) == {"checkpoint": pytest.approx(0.2), "random_reinit": "only checkfree_plus reached"}
