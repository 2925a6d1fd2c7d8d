"""Data-parallel mode, ``model.stages = 1``: every node holds the whole model (stage 0), a path is just
its origin, and all nodes are one Streaming DiLoCo group.

Small and in-process: the config, the one-stage model against ``Transformer`` (same weights, same loss,
same gradients), DiLoCo's fragments over it, the runtime's local iteration against a hand-written
reference step, the coordinator (assignment, paths, rounds, recovery) and the simulator's config. The
multi-process run is in test_data_parallel_run.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from fake_clock import Clock

from lowband.coordinator.core import Coordinator
from lowband.coordinator.errors import Conflict
from lowband.coordinator.planning import compute_plan
from lowband.coordinator.recovery import plan_recovery
from lowband.node.pipeline.runtime import StageRuntime
from lowband.node.sync.diloco import StreamingDiLoCo, exchange_open, fragment_due, fragment_of_params
from lowband.node.sync.outer import OuterSync
from lowband.node.train.along_path import run_path
from lowband.node.train.evaluate import evaluate
from lowband.node.train.export import export_transformer, load_model
from lowband.node.train.model import (
    ModelConfig,
    Transformer,
    WholeStage,
    blocks_per_stage,
    build_stage,
    global_named_parameters,
    model_config_for,
    split_model,
    stage_blocks,
)
from lowband.node.train.optim import build_inner_optimizer, lr_at
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.sim.config import load_sim_config
from lowband.sim.run import allreduce_equivalent_bytes

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(60)

TINY = ModelConfig.from_preset("tiny")
Kind = pb.Instruction.Kind


def batch(seed: int, rows: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, TINY.vocab_size, (rows, seq + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# --- config -------------------------------------------------------------------------------------------

def test_config_accepts_one_stage_and_refuses_zero() -> None:
    assert apply_overrides(RunConfig(), ["model.stages=1"]).model.stages == 1
    with pytest.raises(ConfigError, match=r"model\.stages: must be >= 1"):
        apply_overrides(RunConfig(), ["model.stages=0"])


# --- the model ----------------------------------------------------------------------------------------

def test_stage_zero_of_one_stage_is_the_whole_transformer() -> None:
    model = Transformer(TINY, seed=7)
    stage = build_stage(TINY, 0, 1, seed=7)
    assert isinstance(stage, WholeStage)
    assert blocks_per_stage(TINY, 1) == TINY.n_layers and stage_blocks(TINY, 0, 1) == range(TINY.n_layers)
    # same names (the global ones: blocks.{i}.…), same values from the same seed
    ref = dict(model.named_parameters())
    got = dict(global_named_parameters(stage))
    assert set(got) == set(ref) and set(dict(stage.named_parameters())) == set(ref)
    for name, p in ref.items():
        assert torch.equal(got[name], p), name
    # same loss and the same gradients on the same batch
    x, y = batch(1)
    ref_loss = model.loss(x, y)
    loss = stage.loss(stage.embed_tokens(x), y)
    assert loss.item() == ref_loss.item()
    ref_loss.backward()
    loss.backward()
    for name, p in ref.items():
        torch.testing.assert_close(got[name].grad, p.grad, atol=0, rtol=0, msg=name)
    with pytest.raises(ValueError, match="out of range"):
        build_stage(TINY, 1, 1)


def test_split_into_one_stage_shares_the_weights_and_the_path_of_the_origin_alone_runs_it_all() -> None:
    model = Transformer(TINY, seed=3).eval()
    (whole,) = split_model(model, 1)
    assert whole.output is model.output and whole.blocks[0] is model.blocks[0]
    x, _ = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(run_path([whole], [0, 0], x), model(x), atol=0, rtol=0)


def test_a_one_stage_model_exports_and_evaluates_like_the_transformer(tmp_path: Path) -> None:
    model = Transformer(TINY, seed=4).eval()
    loaded = load_model(export_transformer(tmp_path / "model.pt", model, 1))
    assert loaded.num_stages == 1 and isinstance(loaded.stages[0], WholeStage)
    batches = [batch(5), batch(6)]
    with torch.no_grad():
        expected = sum(model.loss(x, y).item() for x, y in batches) / len(batches)
    assert evaluate(loaded.stages, batches)["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fragments", [1, 2, 3, 4, 6, 8])
def test_fragments_cover_the_whole_stage_exactly_once(fragments: int) -> None:
    stage = build_stage(TINY, 0, 1, seed=0)
    names = [n for n, _ in stage.named_parameters()]
    parts = fragment_of_params(stage.named_parameters(), fragments)
    flat = [n for part in parts for n in part]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    for p, part in enumerate(parts):
        for name in part:
            if name.startswith("blocks."):
                assert int(name.split(".")[1]) % fragments == p, name   # block j -> fragment j mod P
    # embedding, final norm and head land in the same fragments every time (replicas agree)
    assert parts == fragment_of_params(build_stage(TINY, 0, 1, seed=9).named_parameters(), fragments)
    cfg = apply_overrides(RunConfig(), [f"diloco.fragments={fragments}"]).diloco
    assert StreamingDiLoCo(stage, cfg).fragments == parts


# --- the runtime ----------------------------------------------------------------------------------------

def test_a_local_iteration_is_the_reference_step() -> None:
    """Two microbatches: the mean of their gradients, clipped, one AdamW step, the after-step hook; equal to
    the same step taken by hand on ``Transformer`` (up to float summation order: the runtime sums the two
    gradients and divides, the reference backpropagates the mean of the two losses)."""
    train = RunConfig().train
    model = Transformer(TINY, seed=5)
    stage = build_stage(TINY, 0, 1, seed=5)
    ref_opt = build_inner_optimizer(model.parameters(), train)
    hooked: list[int] = []
    runtime = StageRuntime(stage, 0, build_inner_optimizer(stage.parameters(), train), grad_clip=train.grad_clip,
                           lr_fn=lambda it: lr_at(it, train), after_step=hooked.append)
    steps: list[int] = []
    runtime.on_step = lambda r: steps.append(r.iteration)
    try:
        for it in range(2):
            microbatches = [batch(10 * it), batch(10 * it + 1)]
            losses, result = asyncio.run(runtime.train_local(microbatches))
            ref_losses = [model.loss(x, y) for x, y in microbatches]
            ((ref_losses[0] + ref_losses[1]) / 2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            for group in ref_opt.param_groups:
                group["lr"] = lr_at(it, train)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            assert losses == pytest.approx([v.item() for v in ref_losses], abs=1e-5)
            assert result.applied and result.microbatches == 2 and result.iteration == it
        assert runtime.iteration == 2 and hooked == [1, 2] and steps == [0, 1]
        ref = dict(model.named_parameters())
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p, ref[name], atol=1e-5, rtol=1e-4, msg=name)
        val = asyncio.run(runtime.evaluate_local([batch(99)]))
        with torch.no_grad():
            assert val == pytest.approx([float(model.loss(*batch(99)))], abs=1e-4)
    finally:
        runtime.shutdown()


# --- the coordinator ----------------------------------------------------------------------------------


def dp_config(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), ["model.stages=1", "train.microbatches=3", "skippipe.planner=skippipe",
                                         "skippipe.skip_ratio=0.25", "membership.heartbeat_interval_s=0.3",
                                         "membership.lease_s=1.0", "membership.sync_join_window_s=0.5",
                                         "membership.sync_timeout_s=2.0", *overrides])


def join(core: Coordinator, port: int, data: bool = True) -> pb.JoinReply:
    return core.join(pb.JoinRequest(address=f"127.0.0.1:{port}", device="cpu", throughput=1.0, version="0.1",
                                    stage=-1, preferred_stage=-1, has_data=data))


def test_coordinator_puts_every_node_on_stage_zero_with_paths_of_the_origin_alone(caplog) -> None:
    core = Coordinator(dp_config(), clock=Clock())
    replies = [join(core, 9000 + i) for i in range(3)]
    assert [r.stage for r in replies] == [0, 0, 0]
    assert [r.origin_index for r in replies] == [0, 1, 2] and replies[-1].num_origins == 3
    with pytest.raises(Conflict, match=r"model\.stages = 1.*--no-data"):
        join(core, 9100, data=False)
    with caplog.at_level("WARNING"):
        plan = compute_plan(core.plan_inputs())
    assert "planner" not in caplog.text   # bypassed, not failed over
    for r in replies:
        paths = plan.paths[r.node_id]
        assert [(p.microbatch, p.stages, p.node_ids) for p in paths] == [(m, (0,), (r.node_id,)) for m in range(3)]
        assert plan.visits[r.node_id] == {r.node_id: 3}   # each origin is "visited" by its own microbatches
    schedule = core.schedule(pb.ScheduleRequest(node_id=replies[0].node_id))
    assert [tuple(p.stages) for p in schedule.paths] == [(0,)] * 3 and len(schedule.peers) == 3
    # the replicas (all nodes) are one sync group for every fragment
    ids = sorted(r.node_id for r in replies)
    for node_id in ids:
        status = core.sync_round(pb.SyncRoundRequest(node_id=node_id, stage=0, fragment=0, outer_step=1))
    assert status.ready and [p.node_id for p in status.participants] == ids


def test_a_round_waits_for_every_replica_past_the_join_window() -> None:
    """Every replica trains every step: a late one is a straggler to wait for (up to sync_timeout_s), not
    one to leave out after the join window, which would leave it (or, if it ran ahead, all the others) a
    round behind."""
    clock = Clock()
    core = Coordinator(dp_config(), clock=clock)
    a, b = join(core, 9000), join(core, 9001)

    def ask(node: pb.JoinReply) -> pb.SyncRoundReply:
        return core.sync_round(pb.SyncRoundRequest(node_id=node.node_id, stage=0, fragment=0, outer_step=1))

    assert not ask(a).ready
    clock.t += 1.5   # past the 0.5 s join window, inside the 2 s timeout
    assert not ask(a).ready
    status = ask(b)
    assert status.ready and len(status.participants) == 2
    clock.t += 0.1   # a straggler that never comes: the round forms at the timeout with whoever asked
    core.sync_round(pb.SyncRoundRequest(node_id=a.node_id, stage=0, fragment=0, outer_step=2))
    clock.t += 2.1
    late = core.sync_round(pb.SyncRoundRequest(node_id=a.node_id, stage=0, fragment=0, outer_step=2))
    assert late.ready and [p.node_id for p in late.participants] == [a.node_id]


def test_a_lost_replica_is_copied_from_a_live_one_and_nothing_tries_a_bookend_copy() -> None:
    clock = Clock()
    core = Coordinator(dp_config(), clock=clock)
    a, b = join(core, 9000), join(core, 9001)
    for node in (a, b):
        core.heartbeat(pb.HeartbeatRequest(node_id=node.node_id, epoch=core.epoch,
                                           metrics=pb.NodeMetrics(step=5, loss=2.0)))
    clock.t += 0.8
    core.heartbeat(pb.HeartbeatRequest(node_id=a.node_id, epoch=core.epoch, metrics=pb.NodeMetrics(step=6)))
    clock.t += 0.5
    assert core.expire_leases() == [b.node_id]
    replacement = join(core, 9002)
    plan = replacement.instruction.recovery
    assert replacement.stage == 0 and plan.method == "replica-copy"
    assert [s.node_id for s in plan.sources] == [a.node_id] and list(plan.weights) == [1.0]
    # every replica lost: nothing holds a copy of stage 0 (no stages 1 and S-1), so fresh weights, no crash
    wiped = plan_recovery(0, 1, {}, candidates=["j"])
    assert wiped.method == "random-reinit" and wiped.sources == {} and any("stages = 1" in n for n in wiped.notes)
    assert plan_recovery(0, 1, {0: ["a"]}, candidates=["j"]).method == "replica-copy"
    assert plan_recovery(0, 1, {}, candidates=["j"], mode="checkfree").method == "random-reinit"


# --- catching up with the group ------------------------------------------------------------------------

class RecordingCoordinator:
    """Records which fragments are asked for; no round ever forms (nothing is exchanged)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    async def join_sync_round(self, request: pb.SyncRoundRequest) -> pb.SyncRoundReply:
        self.asked.append((request.node_id, request.fragment))
        return pb.SyncRoundReply(abandoned=True, reason="quorum not reached", outer_step=request.outer_step)


def test_exchange_open_follows_the_schedule_and_the_overlap() -> None:
    cfg = apply_overrides(RunConfig(), ["diloco.inner_steps=4", "diloco.fragments=2", "diloco.overlap=1"]).diloco
    assert [p for p in range(2) if exchange_open(6, p, cfg)] == [1]    # fragment 1 due at 2, 6, 10
    assert not any(exchange_open(7, p, cfg) for p in range(2))          # merged at 7
    two = apply_overrides(RunConfig(), ["diloco.inner_steps=4", "diloco.fragments=2", "diloco.overlap=2"]).diloco
    assert exchange_open(7, 1, two) and not exchange_open(8, 1, two)
    zero = apply_overrides(RunConfig(), ["diloco.inner_steps=4", "diloco.overlap=0"]).diloco
    assert not exchange_open(4, 0, zero)   # merged in the step that snapshots it


@pytest.mark.parametrize(("open_at", "exchanged"), [(12, [1]), (13, [])])
def test_a_replica_that_jumps_to_its_group_exchanges_only_the_round_open_there(open_at: int,
                                                                                 exchanged: list[int]) -> None:
    """The source (at committed step ``open_at``; fragment 1 syncs at 4, 12, ...) is ahead in fragment 0,
    whose round this replica missed, and level in fragment 1. Fragment 0 is adopted but not exchanged (its
    next round is steps away: asking now would open a round of one); fragment 1 is exchanged at once only
    when its round is open at the source (the group is in it now, and the jump skips its sync point)."""
    async def main() -> tuple[list[tuple[str, int]], list[int], dict[int, int], int]:
        cfg = apply_overrides(RunConfig(), ["diloco.inner_steps=8", "diloco.fragments=2", "diloco.overlap=1",
                                            "membership.sync_join_window_s=0.2", "membership.sync_timeout_s=0.4"])
        coordinator = RecordingCoordinator()
        source = OuterSync(build_stage(TINY, 0, 1, seed=0), 0, "source", cfg, coordinator, "t")  # type: ignore[arg-type]
        mine = OuterSync(build_stage(TINY, 0, 1, seed=0), 0, "mine", cfg, coordinator, "t")  # type: ignore[arg-type]
        source.diloco.outer.steps.update({0: 2, 1: 1})
        mine.diloco.outer.steps.update({0: 1, 1: 1})
        mine._missed.add(0)   # its round formed without us
        try:
            def replica() -> tuple[list[int], int]:
                source.after_step(open_at)
                parts, step = source.state_at()
                adopted = mine.load_parts(parts, catch_up=True, open_at=step)
                assert fragment_due(open_at + 1, cfg.diloco) is None
                mine.after_step(open_at + 1)   # after the jump: the next step, no sync point of its own
                return adopted, step
            adopted, step = await asyncio.to_thread(replica)
            await asyncio.sleep(0.05)
        finally:
            await mine.close()
            await source.close()
        return coordinator.asked, adopted, dict(mine.diloco.outer.steps), step

    asked, adopted, steps, step = asyncio.run(main())
    assert step == open_at                        # the copy says which step it is from
    assert adopted == [0] and steps == {0: 2, 1: 1}
    assert [f for node, f in asked if node == "mine"] == exchanged


# --- the simulator's config --------------------------------------------------------------------------

def test_sim_defaults_adapt_their_preemptions_and_a_bad_target_says_what_to_do(tmp_path: Path) -> None:
    cfg = load_sim_config(None, ["model.stages=1", "sim.origins=4"])
    assert cfg.run.model.stages == 1 and cfg.sim.origins == 4
    assert [p.target for p in cfg.sim.preemptions] == ["replica:0", "replica:0"]   # one replica at a time
    assert load_sim_config(None, ["model.stages=1", "sim.origins=1"]).sim.preemptions == []
    own = tmp_path / "dp.toml"
    own.write_text('[model]\nstages = 1\n\n[sim]\norigins = 3\n\n[[sim.preemptions]]\ntarget = "replica:1"\n'
                   'at_step = 10\n')
    with pytest.raises(ConfigError, match=r"stage 1 does not exist.*target 'replica:0'"):
        load_sim_config(own)
    own.write_text('[model]\nstages = 1\n\n[sim]\norigins = 3\npreemptions = []\n')
    assert load_sim_config(own).sim.preemptions == []   # a config of its own keeps its (empty) script
    # every replica holds the whole model (the run's own: the default's is a subspace model): the
    # all-reduce a data-parallel run would need every step
    params = model_config_for(cfg.run.model).num_params()
    assert params < TINY.num_params()
    assert allreduce_equivalent_bytes(cfg, 10) == 10 * 2 * (4 - 1) * params * 4
