"""The daemon's DiLoCo driver (``lowband.node.sync.outer.OuterSync``) with two replicas over real gRPC
ReduceShard servers and a fake coordinator that forms every round at once: the merge
step (overlap 0 merges in the snapshot's own step) and the byte count (requests and
replies)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from reduce_servers import start_reduce_server
from torch import nn

from lowband.node.sync.averaging_backend import Averaged
from lowband.node.sync.diloco import SyncJob, fragment_due
from lowband.node.sync.grpc_averager import ShardReducer
from lowband.node.sync.outer import OuterSync
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(60)
TOKEN = "diloco-sync-test-token"


async def start_server(reducer: ShardReducer) -> tuple[grpc.aio.Server, str]:
    return await start_reduce_server(reducer, TOKEN)


class TinyStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)  # every replica starts from the same weights
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


class FakeCoordinator:
    """Every JoinSyncRound is ready with the same two participants."""

    def __init__(self) -> None:
        self.peers: list[pb.PeerInfo] = []

    async def join_sync_round(self, request: pb.SyncRoundRequest) -> pb.SyncRoundReply:
        return pb.SyncRoundReply(round_id=request.outer_step, participants=self.peers, ready=True,
                                 outer_step=request.outer_step)


def nudge(module: nn.Module, seed: int) -> None:
    """A stand-in for an inner step: every replica moves its weights differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


async def run_pair(overlap: int, steps: int, codec: str = "fp32", extra: tuple[str, ...] = ()
                   ) -> tuple[list[OuterSync], list[list[int]]]:
    cfg = apply_overrides(RunConfig(), [
        "diloco.inner_steps=4", "diloco.fragments=1", f"diloco.overlap={overlap}", "diloco.alpha=0",
        f"diloco.codec={codec}", "diloco.peer_timeout_s=5", "membership.sync_join_window_s=1",
        "membership.sync_timeout_s=2", *extra])
    coordinator = FakeCoordinator()
    modules = [TinyStage(), TinyStage()]
    syncs = [OuterSync(m, stage=1, node_id=f"n{i}", config=cfg, client=coordinator, token=TOKEN)  # type: ignore[arg-type]
             for i, m in enumerate(modules)]
    servers = []
    try:
        for i, s in enumerate(syncs):
            server, address = await start_server(s.reducer)
            servers.append(server)
            coordinator.peers.append(pb.PeerInfo(node_id=f"n{i}", address=address, stage=1))
        outer_steps_after: list[list[int]] = [[], []]

        def replica(i: int) -> None:
            for step in range(1, steps + 1):
                nudge(modules[i], seed=100 * i + step)
                syncs[i].after_step(step)
                outer_steps_after[i].append(syncs[i].total_outer_steps())

        await asyncio.gather(*(asyncio.to_thread(replica, i) for i in range(2)))
        return syncs, outer_steps_after
    finally:
        for s in syncs:
            await s.close()
        for server in servers:
            await server.stop(None)


def test_overlap_zero_merges_in_the_snapshot_step_and_bytes_count_both_directions() -> None:
    syncs, outer_steps_after = asyncio.run(run_pair(overlap=0, steps=5))
    # H=4: the fragment is snapshotted after step 4 and, with overlap 0, merged in step 4 itself
    for counts in outer_steps_after:
        assert counts == [0, 0, 0, 1, 1]
    for s in syncs:
        assert s.diloco.pending == []
        assert s.sync_bytes_sent > 0 and s.reducer.bytes_sent > 0
        assert s.wire_bytes_sent == s.sync_bytes_sent + s.reducer.bytes_sent
    # alpha 0: both replicas hold exactly θ_global_new after the merge (and agree on it)
    g0, g1 = (s.diloco.global_params for s in syncs)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_overlap_one_merges_one_step_later() -> None:
    _, outer_steps_after = asyncio.run(run_pair(overlap=1, steps=5))
    for counts in outer_steps_after:
        assert counts == [0, 0, 0, 0, 1]


def test_the_daemons_outer_sync_averages_sparse_parts_to_identical_theta_global() -> None:
    """codec "sparse" through OuterSync and the grpc backend (the daemon's path): both replicas apply
    the owners' re-sparsified mean bit for bit, keep their own error feedback, send fewer bytes."""
    dense, _ = asyncio.run(run_pair(overlap=1, steps=9))
    syncs, outer_steps_after = asyncio.run(run_pair(
        overlap=1, steps=9, codec="sparse", extra=("diloco.sparse_chunk=16", "diloco.sparse_topk=2")))
    for counts in outer_steps_after:
        assert counts[-1] == 2
    g0, g1 = (s.diloco.global_params for s in syncs)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    init = TinyStage()
    assert any(not torch.equal(g0[n], p.detach()) for n, p in init.named_parameters())
    for s in syncs:
        assert s.diloco.error.keys() == [0]
        assert s.sync_bytes_sent < 0.6 * dense[0].sync_bytes_sent   # 84 elements: framing is most of it


class RebuiltStageCoordinator:
    """The stage's last round formed with replicas that are all dead: the first ask is answered with
    that round and ``adopt_outer_step``; later rounds are abandoned (no quorum), so nothing averages."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def join_sync_round(self, request: pb.SyncRoundRequest) -> pb.SyncRoundReply:
        self.asked.append(request.outer_step)
        if len(self.asked) == 1:
            return pb.SyncRoundReply(round_id=1, ready=True, outer_step=request.outer_step, adopt_outer_step=5,
                                     participants=[pb.PeerInfo(node_id="dead", address="127.0.0.1:1", stage=1)])
        return pb.SyncRoundReply(abandoned=True, reason="quorum not reached", outer_step=request.outer_step)


def test_a_replica_of_a_rebuilt_stage_continues_the_round_numbering_instead_of_resyncing() -> None:
    async def main() -> tuple[list[int], list[str], int]:
        cfg = apply_overrides(RunConfig(), ["diloco.inner_steps=4", "diloco.fragments=1", "diloco.overlap=0",
                                            "membership.sync_join_window_s=1", "membership.sync_timeout_s=2"])
        coordinator = RebuiltStageCoordinator()
        events: list[str] = []
        resyncs: list[int] = []

        async def resync() -> None:
            resyncs.append(1)

        sync = OuterSync(TinyStage(), stage=1, node_id="n0", config=cfg, client=coordinator,  # type: ignore[arg-type]
                         token=TOKEN, on_event=lambda kind, **_: events.append(kind), resync=resync)
        try:
            def replica() -> None:
                for step in range(1, 9):
                    sync.after_step(step)
            await asyncio.to_thread(replica)
            await asyncio.sleep(0.05)   # let the events reach the loop
        finally:
            await sync.close()
        return coordinator.asked, events, len(resyncs)

    asked, events, resyncs = asyncio.run(main())
    # round 1 formed without us; nobody holds the outer state, so the next sync asks for round 6
    assert asked == [1, 6]
    assert "outer-adopt" in events and resyncs == 0


class MissedRoundCoordinator:
    """Fragment 1's first round formed without this replica (the group is ahead); every other round is
    abandoned at once, so no exchange has to run."""

    def __init__(self) -> None:
        self.asked: list[int] = []   # fragments, in the order asked

    async def join_sync_round(self, request: pb.SyncRoundRequest) -> pb.SyncRoundReply:
        self.asked.append(request.fragment)
        if request.fragment == 1 and self.asked.count(1) == 1:
            return pb.SyncRoundReply(round_id=1, ready=True, outer_step=request.outer_step,
                                     participants=[pb.PeerInfo(node_id="ahead", address="127.0.0.1:1", stage=1)])
        return pb.SyncRoundReply(abandoned=True, reason="quorum not reached", outer_step=request.outer_step)


def test_after_a_resync_only_the_fragment_whose_round_was_missed_is_adopted_and_exchanged_off_schedule() -> None:
    """The source replica is ahead in fragment 1 (whose round we missed) and behind in fragment 0: only
    fragment 1 is adopted, and only it is exchanged off schedule. Catching up a fragment the group is not
    syncing now would form a round of one, which the group's next round of that fragment then finds formed
    without it: the replicas would take turns falling behind."""
    async def main() -> tuple[list[int], list[int], dict[int, int]]:
        cfg = apply_overrides(RunConfig(), ["diloco.inner_steps=4", "diloco.fragments=2", "diloco.overlap=0",
                                            "membership.sync_join_window_s=1", "membership.sync_timeout_s=2"])
        coordinator = MissedRoundCoordinator()
        ahead = OuterSync(TinyStage(), stage=1, node_id="ahead", config=cfg, client=coordinator,  # type: ignore[arg-type]
                          token=TOKEN)
        missed = asyncio.Event()

        async def resync() -> None:
            missed.set()

        sync = OuterSync(TinyStage(), stage=1, node_id="n0", config=cfg, client=coordinator,  # type: ignore[arg-type]
                         token=TOKEN, resync=resync)
        ahead.diloco.outer.steps.update({0: 1, 1: 3})
        sync.diloco.outer.steps[0] = 2   # this replica is further in fragment 0
        loop = asyncio.get_running_loop()
        adopted: list[int] = []
        try:
            def replica() -> None:
                step = 0
                while coordinator.asked.count(1) == 0:   # train until fragment 1's round is asked
                    step += 1
                    sync.after_step(step)
                asyncio.run_coroutine_threadsafe(asyncio.wait_for(missed.wait(), 5), loop).result()
                adopted.extend(sync.load_parts(ahead.state_parts(), catch_up=True))   # the daemon's resync
                before = len(coordinator.asked)
                assert fragment_due(step + 1, cfg.diloco) is None   # not a sync point of either fragment
                sync.after_step(step + 1)
                del coordinator.asked[:before]
            await asyncio.to_thread(replica)
        finally:
            await sync.close()
            await ahead.close()
        return coordinator.asked, adopted, dict(sync.diloco.outer.steps)

    asked, adopted, steps = asyncio.run(main())
    assert adopted == [1] and steps == {0: 2, 1: 3}   # fragment 0 is not taken back to the source's step
    assert asked == [1]   # fragment 1 catches up; fragment 0 waits for its own sync point


class RecordingCoordinator(FakeCoordinator):
    """Forms every round at once with `peers`, and keeps every request."""

    def __init__(self, peers: list[pb.PeerInfo]) -> None:
        super().__init__()
        self.peers = peers
        self.requests: list[pb.SyncRoundRequest] = []

    async def join_sync_round(self, request: pb.SyncRoundRequest) -> pb.SyncRoundReply:
        self.requests.append(request)
        return await super().join_sync_round(request)


class ScriptedBackend:
    """A backend whose rounds fail first, then average to a fixed mean; it publishes DHT-style maddrs."""

    name = "scripted"
    reducer = None
    served_bytes = 7
    maddrs = ["/ip4/10.0.0.1/tcp/4001/p2p/QmMe"]

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str], int]] = []
        self.closed = False

    async def start(self) -> None:
        return None

    async def average(self, job: SyncJob, reply: pb.SyncRoundReply, my_index: int) -> Averaged:
        self.calls.append((reply.round_id, [p.node_id for p in reply.participants], my_index))
        if len(self.calls) == 1:
            return Averaged(None, bytes_sent=3, fields={"group_size": 0})
        return Averaged(torch.full_like(job.delta, 0.5), bytes_sent=5, fields={"group_size": 2})

    async def close(self) -> None:
        self.closed = True


def test_the_configured_backend_averages_the_coordinators_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """OuterSync asks the coordinator for the round with the backend's maddrs, lets the backend average
    it, skips a round it averaged nothing in (θ_global unchanged) and says which backend synced."""
    backend = ScriptedBackend()
    chosen: list[str] = []

    def fake_make_backend(cfg: object, *_: object, **__: object) -> ScriptedBackend:
        chosen.append(cfg.backend)   # type: ignore[attr-defined]
        return backend

    monkeypatch.setattr("lowband.node.sync.outer.make_backend", fake_make_backend)

    async def main() -> tuple[OuterSync, RecordingCoordinator, list[tuple[str, dict]], list[int]]:
        cfg = apply_overrides(RunConfig(), ["diloco.inner_steps=2", "diloco.fragments=1", "diloco.overlap=0",
                                            "diloco.backend=hivemind", "membership.sync_join_window_s=1",
                                            "membership.sync_timeout_s=2"])
        coordinator = RecordingCoordinator([pb.PeerInfo(node_id="n0", stage=1), pb.PeerInfo(node_id="n1", stage=1)])
        events: list[tuple[str, dict]] = []
        sync = OuterSync(TinyStage(), stage=1, node_id="n1", config=cfg, client=coordinator,  # type: ignore[arg-type]
                         token=TOKEN, on_event=lambda kind, **f: events.append((kind, f)))
        counts: list[int] = []
        try:
            def replica() -> None:
                for step in range(1, 5):
                    sync.after_step(step)
                    counts.append(sync.total_outer_steps())
            await asyncio.to_thread(replica)
            await asyncio.sleep(0.05)   # let the events reach the loop
        finally:
            await sync.close()
        return sync, coordinator, events, counts

    sync, coordinator, events, counts = asyncio.run(main())
    assert chosen == ["hivemind"] and sync.reducer is None and backend.closed
    assert [list(r.sync_maddrs) for r in coordinator.requests] == [ScriptedBackend.maddrs] * 2
    assert [(c[1], c[2]) for c in backend.calls] == [(["n0", "n1"], 1)] * 2
    assert counts == [0, 0, 0, 1]   # the first round averaged nothing: no outer step
    kinds = [(kind, f.get("backend"), f.get("reason")) for kind, f in events if kind.startswith("outer-")]
    assert ("outer-skip", None, "scripted averaged nothing") in kinds
    assert ("outer-sync", "scripted", None) in kinds
    assert sync.outer_steps == 1 and sync.wire_bytes_sent == 3 + 5 + 7


def test_a_hivemind_run_without_hivemind_installed_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowband.node.sync import averaging_backend

    cfg = RunConfig().diloco
    cfg.backend = "hivemind"
    monkeypatch.setattr(averaging_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"diloco\.backend: 'hivemind' needs hivemind"):
        averaging_backend.require_backend(cfg)
    cfg.backend = "grpc"
    averaging_backend.require_backend(cfg)   # nothing to install
