"""The hivemind backend: the same outer loop, averaged by hivemind's DecentralizedAverager."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import DilocoSection

hivemind_backend = pytest.importorskip("lowband.node.sync.hivemind_averager")
from lowband.node.sync.averaging_backend import GrpcBackend, make_backend  # noqa: E402
from lowband.node.sync.diloco import StreamingDiLoCo, SyncJob  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow  # spawns hivemind's DHT and averager processes (~10-30 s on a busy machine)
def test_two_replicas_find_each_other_and_apply_the_same_mean() -> None:
    cfg = DilocoSection(inner_steps=2, fragments=2, overlap=0, alpha=0.0, outer_lr=0.7, outer_momentum=0.9,
                        codec="int8", backend="hivemind")
    models = [nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    reps = [StreamingDiLoCo(m, cfg) for m in models]
    numels = [sum(reps[0].params[n].numel() for n in f) for f in reps[0].fragments]
    # no bootstrap peer: each DHT starts alone, the second connects to the first's maddrs (as a round says)
    avgs = [hivemind_backend.HivemindAverager(numels, run_id="t", stage=1, codec=cfg.codec, target_group_size=2)
            for _ in range(2)]
    try:
        assert all(m.startswith("/ip4/127.0.0.1/tcp/") for m in avgs[0].maddrs)
        assert avgs[1].connect(avgs[0].maddrs) == 1
        with ThreadPoolExecutor(2) as pool:
            for step in (1, 2, 3, 4):
                with torch.no_grad():
                    for i, m in enumerate(models):
                        for p in m.parameters():
                            p.sub_(0.1 * (i + 1) * torch.randn_like(p))   # replica-specific "training"
                jobs = [r.begin_sync(step) for r in reps]
                if jobs[0] is None:
                    continue
                futures = [pool.submit(a.average, j.fragment, j.delta, timeout_s=20.0, gather={"node": i})
                           for i, (a, j) in enumerate(zip(avgs, jobs, strict=True))]
                results = [f.result() for f in futures]
                expected = (jobs[0].delta + jobs[1].delta) / 2
                for (avg, stats), rep, job in zip(results, reps, jobs, strict=True):
                    assert avg is not None, stats.error
                    assert stats.group_size == 2 and stats.bytes_sent > 0
                    assert sorted(g["node"] for g in stats.gathered) == [0, 1]
                    # 8-bit codec: near the mean, and (below) the very same bits on both replicas
                    torch.testing.assert_close(avg, expected, rtol=0.05, atol=0.05)
                    rep.finish_sync(job, avg)
                assert torch.equal(results[0][0], results[1][0])
        for name, t in reps[0].global_params.items():
            assert torch.equal(reps[1].global_params[name], t), name
        assert reps[0].outer.steps == reps[1].outer.steps == {0: 2, 1: 2}
    finally:
        for a in avgs:
            a.shutdown()
    assert all(not a.dht.is_alive() for a in avgs)


def test_codec_mapping_and_wire_bytes() -> None:
    x = torch.randn(4096)
    full = hivemind_backend.wire_bytes_per_peer(x, "fp32", 4)
    assert full == pytest.approx(4096 * 4 * 1.5, rel=0.01)
    assert hivemind_backend.wire_bytes_per_peer(x, "fp4", 4) < full / 3
    assert hivemind_backend.wire_bytes_per_peer(x, "fp32", 1) == 0
    with pytest.raises(ValueError, match="codec"):
        hivemind_backend.hivemind_compression("zip")


def test_the_dht_listens_on_the_nodes_host() -> None:
    assert hivemind_backend.listen_maddr("10.0.0.2") == "/ip4/10.0.0.2/tcp/0"
    assert hivemind_backend.listen_maddr("[::1]") == "/ip6/::1/tcp/0"
    assert hivemind_backend.listen_maddr("localhost") == "/ip4/127.0.0.1/tcp/0"


def test_the_config_picks_the_backend_and_hivemind_serves_no_reduce_shard() -> None:
    async def main() -> None:
        grpc_backend = make_backend(DilocoSection(backend="grpc"), [8], run_id="r", stage=0, node_id="n",
                                    token="t", host="127.0.0.1")
        assert isinstance(grpc_backend, GrpcBackend) and grpc_backend.reducer is not None
        assert grpc_backend.maddrs == []
        hm = make_backend(DilocoSection(backend="hivemind"), [8], run_id="r", stage=0, node_id="n", token="t",
                          host="127.0.0.1")
        assert isinstance(hm, hivemind_backend.HivemindBackend)
        assert hm.reducer is None and hm.maddrs == [] and hm.served_bytes == 0   # nothing started yet
        await hm.close()   # never started: nothing to stop
        await grpc_backend.close()

    asyncio.run(main())


def test_every_sender_gets_the_mean_itself_encoded_once() -> None:
    """Stock hivemind answers ``mean - part``, which each peer adds back to its own part: equal only up
    to rounding. Our reducer's answer minus any part stays the mean; the local sender's copy goes
    through the same codec as the remote senders' replies."""
    async def main() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        reducer = hivemind_backend._MeanReducer([torch.Size([64])], 2, local_sender=0,
                                                compression=hivemind_backend.hivemind_compression("fp16"))
        parts = [torch.randn(64) for _ in range(2)]
        local, remote = await asyncio.gather(*(reducer.accumulate_part(i, 0, parts[i]) for i in range(2)))
        return local - parts[0], remote - parts[1], (parts[0] + parts[1]) / 2

    local, remote, mean = asyncio.run(main())
    torch.testing.assert_close(remote, mean)                  # uncompressed here: encoded when sent
    assert torch.equal(local, remote.half().float())           # what fp16 makes of the mean, as peers get it


class _FakeAverager:
    """Stands in for a started HivemindAverager: a group formed, with what each member sent along."""

    def __init__(self, gathered: list[dict[str, object]]) -> None:
        self.gathered = gathered
        self.connected: list[str] = []

    def connect(self, maddrs: list[str]) -> int:
        self.connected.extend(maddrs)
        return len(maddrs)

    def average(self, fragment: int, flat: torch.Tensor, **_: object) -> tuple[torch.Tensor, object]:
        return flat.clone(), hivemind_backend.HivemindStats(group_size=len(self.gathered), bytes_sent=10,
                                                            gathered=self.gathered)


@pytest.mark.parametrize(("gathered", "applied"), [
    ([{"round_id": 7, "node_id": "a"}, {"round_id": 7, "node_id": "b"}], True),
    ([{"round_id": 6, "node_id": "a"}, {"round_id": 7, "node_id": "b"}], False),   # another round's peer
    ([{"round_id": 7, "node_id": "a"}, {"round_id": 7, "node_id": "c"}], False),   # not a participant
])
def test_a_group_is_applied_only_when_it_is_the_rounds_participants(gathered: list[dict[str, object]],
                                                                      applied: bool) -> None:
    async def main() -> tuple[object, list[str]]:
        backend = hivemind_backend.HivemindBackend([4], run_id="r", stage=0, node_id="a",
                                                   cfg=DilocoSection(backend="hivemind"), host="127.0.0.1")
        fake = _FakeAverager(gathered)
        backend._starting = asyncio.get_running_loop().create_future()
        backend._starting.set_result(fake)   # type: ignore[arg-type]
        job = SyncJob(fragment=0, step=2, merge_step=2, outer_step=0, names=["w"], shapes=[torch.Size([4])],
                      delta=torch.ones(4), finite=True)
        reply = pb.SyncRoundReply(round_id=7, ready=True, participants=[
            pb.PeerInfo(node_id="a", sync_maddrs=["/ip4/127.0.0.1/tcp/1/p2p/A"]),
            pb.PeerInfo(node_id="b", sync_maddrs=["/ip4/127.0.0.1/tcp/2/p2p/B"])])
        result = await backend.average(job, reply, 0)
        return result.mean, fake.connected

    mean, connected = asyncio.run(main())
    assert connected == ["/ip4/127.0.0.1/tcp/2/p2p/B"]   # the other participant's DHT, not its own
    assert (mean is not None) == applied
