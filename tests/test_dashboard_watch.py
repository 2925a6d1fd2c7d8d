"""The status document (coordinator/watch.py) on a coordinator core with fake clocks: bytes per second by
kind and their reset after a restarted node, the loss history, the links' share of a sender's activation
bytes, sync rounds formed and abandoned, and the Prometheus collector over the same document."""

from __future__ import annotations

import pytest
from fake_clock import Clock
from prometheus_client.parser import text_string_to_metric_families

from lowband.coordinator.core import Coordinator
from lowband.coordinator.prometheus import exposition, registry_for
from lowband.coordinator.watch import RunWatch
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig, apply_overrides


def _core(lease: Clock, wall: Clock) -> Coordinator:
    config = apply_overrides(RunConfig(), [
        "model.stages=2", "membership.lease_s=100", "membership.min_sync_participants=2",
        "membership.sync_join_window_s=1", "membership.sync_timeout_s=2", "skippipe.planner=full"])
    return Coordinator(config, clock=lease, wall_clock=wall)


def _join(core: Coordinator, port: int, stage: int) -> pb.JoinReply:
    return core.join(pb.JoinRequest(address=f"127.0.0.1:{port}", device="cpu", throughput=1.0, version="0.1",
                                    stage=-1, preferred_stage=stage, has_data=stage == 0))


def _beat(core: Coordinator, node: pb.JoinReply, step: int, activations: int, loss: float = 0.0) -> None:
    core.heartbeat(pb.HeartbeatRequest(node_id=node.node_id, epoch=core.epoch, metrics=pb.NodeMetrics(
        step=step, loss=loss, activation_bytes_sent=activations, sync_bytes_sent=10 * step,
        control_bytes_sent=step, bytes_sent=activations + 11 * step)))


def test_rates_loss_history_links_and_rounds() -> None:
    lease, wall = Clock(50.0), Clock(1_000.0)
    core = _core(lease, wall)
    watch = RunWatch(core, wall_clock=wall)
    origin, block = _join(core, 9000, 0), _join(core, 9001, 1)
    core.current_plan()   # the plan the links are apportioned over: origin -> block -> origin, both ways
    _beat(core, origin, step=1, activations=1_000, loss=4.0)
    _beat(core, block, step=1, activations=500)
    watch.sample()
    wall.t += 2.0
    _beat(core, origin, step=3, activations=5_000, loss=3.0)
    _beat(core, block, step=3, activations=2_500)
    watch.sample()
    watch.sample()   # no step since: no second point at step 3

    doc = watch.document()
    assert doc["loss"] == {origin.node_id: [[1_000.0, 1, 4.0], [1_002.0, 3, 3.0]]}
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert nodes[origin.node_id]["bytes_per_s"] == pytest.approx(
        {"activations": 2_000.0, "sync": 10.0, "state": 0.0, "control": 1.0})
    assert doc["bytes_per_s"]["series"][1][1:] == pytest.approx([3_000.0, 20.0, 0.0, 2.0])
    links = {(link["from"], link["to"]): link for link in doc["links"]}
    # the origin sends on one link only (to the block, forward; the block answers backward)
    assert links[(origin.node_id, block.node_id)]["activation_Bps"] == pytest.approx(2_000.0)
    assert links[(block.node_id, origin.node_id)]["activation_Bps"] == pytest.approx(1_000.0)
    assert doc["paths"]["current"] and doc["paths"]["origins"][origin.node_id][0]["node_ids"] == \
        [origin.node_id, block.node_id, origin.node_id]

    # a node restarted under its old id reports from zero: its rate is 0, never negative; the origin's
    # rate is over the whole window (no heartbeat since: lower)
    wall.t += 2.0
    _beat(core, block, step=1, activations=100)
    watch.sample()
    doc = watch.document()
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert nodes[block.node_id]["bytes_per_s"]["activations"] == 0.0
    assert nodes[origin.node_id]["bytes_per_s"]["activations"] == pytest.approx(1_000.0)
    assert doc["bytes_per_s"]["now"]["activations"] == pytest.approx(1_000.0)

    # stage 1 has one replica and a minimum of two: its round is abandoned after the timeout
    core.sync_round(pb.SyncRoundRequest(node_id=block.node_id, stage=1, fragment=0, outer_step=1))
    lease.t += 3.0
    reply = core.sync_round(pb.SyncRoundRequest(node_id=block.node_id, stage=1, fragment=0, outer_step=1))
    assert reply.abandoned
    assert watch.document()["sync_rounds"] == [
        {"stage": 1, "fragment": 0, "formed": 0, "failed": 1, "last_outer_step": 0}]

    families = {f.name: f for f in text_string_to_metric_families(exposition(registry_for(watch)).decode())}
    failed = families["lowband_sync_rounds_failed"].samples
    assert [(s.labels, s.value) for s in failed if s.name.endswith("_total")] == \
        [({"stage": "1", "fragment": "0"}, 1.0)]
    loss = families["lowband_node_loss"].samples
    assert [(s.labels, s.value) for s in loss] == [({"node": origin.node_id, "stage": "0"}, 3.0)]
