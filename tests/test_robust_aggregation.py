"""Robust aggregation at shard owners (diloco.robust): clip and trimmed-mean math by hand, the running
median across rounds, the property that a poisoned round moves θ_global no further than a clean one
(pure and over real gRPC), round-participants-only ReduceShard, and the rejection records."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
import torch
from reduce_servers import start_reduce_server

from lowband.coordinator.cli import format_status
from lowband.node.sync.grpc_averager import ChannelPool, ShardReducer, allreduce_mean
from lowband.node.sync.robust_mean import (
    NormHistory,
    clip_bound,
    lower_median,
    robust_mean,
    shard_bounds,
    trimmed_mean,
)
from lowband.protocols import node_pb2
from lowband.protocols.config import ConfigError, DilocoSection

torch.set_num_threads(1)
TOKEN = "robust-test-token"
pytestmark = pytest.mark.timeout(60)

Poison = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
POISONS: dict[str, Poison] = {
    "x1e4": lambda d, g: d * 1e4,
    "sign-flip": lambda d, g: -d,
    "noise": lambda d, g: torch.randn(d.shape, generator=g) * 1e3,
}


def honest_parts(n: int, seed: int, numel: int = 400, equal_norms: bool = False) -> list[torch.Tensor]:
    """Replicas' pseudo-gradients: a shared descent direction plus each replica's own data noise
    (cosine between two of them about 0.3, as replicas on different shards see)."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(numel, generator=g)
    parts = [signal + 1.5 * torch.randn(numel, generator=g) for _ in range(n)]
    if equal_norms:
        parts = [p / p.norm() * 10.0 for p in parts]
    return parts


# --------------------------------------------------------------------------- the math, by hand


def test_two_parts_clip_both_to_the_smaller_norm() -> None:
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0])      # norms 5 and 10
    res = robust_mean([a, b], clip_multiple=1.0)
    assert res.clip_bound == 5.0 and res.clipped == [1] and res.reference == 5.0
    assert res.mean is not None and res.mean.tolist() == [1.5, 4.5]  # ([3, 4] + [0, 5]) / 2
    # clip_multiple x the smaller norm: 10 is within 2 x 5, nothing clipped
    res2 = robust_mean([a, b], clip_multiple=2.0)
    assert res2.clipped == [] and res2.mean is not None and res2.mean.tolist() == [1.5, 7.0]
    # once the running median is known it bounds too: min(1 x 5, 1 x 2) = 2
    res3 = robust_mean([a, b], clip_multiple=1.0, reference=2.0)
    assert res3.clip_bound == 2.0 and res3.clipped == [0, 1]
    assert res3.mean is not None and torch.allclose(res3.mean, torch.tensor([0.6, 1.8]))  # (0.4a + 0.2b) / 2


def test_three_parts_clip_then_trimmed_mean() -> None:
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0]), torch.tensor([100.0, -50.0])
    # warm-up: the round's lower median of [2, sqrt 5, 111.8] is sqrt 5; c is scaled to [2, -1]
    res = robust_mean([a, b, c], clip_multiple=1.0, trim=True)
    assert res.clipped == [2] and res.trimmed
    assert res.clip_bound == pytest.approx(5 ** 0.5) and res.reference == pytest.approx(5 ** 0.5)
    # per coordinate, drop the lowest and the highest: x of [1, 2, 2] -> 2, y of [2, 0, -1] -> 0
    assert res.mean is not None and torch.allclose(res.mean, torch.tensor([2.0, 0.0]))
    # with a known running median the bound is clip_multiple x it: 3 x 1 = 3 clips nothing but c
    res2 = robust_mean([a, b, c], clip_multiple=3.0, reference=1.0, trim=True)
    assert res2.clip_bound == 3.0 and res2.clipped == [2]
    # "clip" mode: the mean of the clipped parts, no trim
    res3 = robust_mean([a, b, c], clip_multiple=1.0, trim=False)
    assert not res3.trimmed and res3.mean is not None and torch.allclose(res3.mean, torch.tensor([5 / 3, 1 / 3]))
    assert trimmed_mean(torch.tensor([[1.0], [5.0], [2.0], [100.0]])).tolist() == [3.5]   # mean of 2 and 5
    with pytest.raises(ValueError):
        trimmed_mean(torch.tensor([[1.0], [2.0]]))


def test_clip_bound_rules_and_bad_arguments() -> None:
    assert clip_bound([4.0], 1.0, None) == float("inf")           # a round of one, nothing known
    assert clip_bound([4.0], 2.0, 3.0) == 6.0
    assert clip_bound([4.0, 9.0], 1.0, None) == 4.0
    assert clip_bound([1.0, 2.0, 30.0, 40.0], 1.5, None) == 3.0   # lower median 2
    assert clip_bound([1.0, 2.0, 30.0], 1.0, 0.0) == 2.0           # a zero reference counts as unknown
    assert lower_median([3.0, 1.0]) == 1.0 and lower_median([5.0, 1.0, 3.0]) == 3.0
    with pytest.raises(ValueError):
        clip_bound([1.0], 0.5, None)
    with pytest.raises(ValueError):
        robust_mean([torch.ones(2)], clip_multiple=0.5)


def test_running_median_across_rounds() -> None:
    h = NormHistory(keep=4, warmup=3)
    key = (0, 0, 2, 1)
    for value, expected in ((2.0, None), (0.0, None), (float("nan"), None), (4.0, None), (100.0, 4.0),
                            (3.0, 3.5), (5.0, 4.5), (1.0, 4.0)):
        h.record(key, value)          # 0 and NaN are not kept: a silent round cannot pin the bound at 0
        assert h.reference(key) == expected
    assert h.reference((0, 0, 3, 1)) is None   # another shard layout starts its own warm-up
    # the owner's rounds: a poisoned part never becomes the reference (lower median before clipping)
    hist = NormHistory()
    for round_ in range(5):
        parts = honest_parts(2, round_)
        parts[1] = parts[1] * 1e4
        res = robust_mean(parts, clip_multiple=1.0, reference=hist.reference("k"))
        hist.record("k", res.reference)
        assert res.reference == pytest.approx(float(parts[0].norm()))
    assert hist.reference("k") == pytest.approx(float(torch.tensor(
        [honest_parts(2, r)[0].norm() for r in range(5)]).median()), rel=1e-6)


def test_config_validates_robust_keys() -> None:
    cfg = DilocoSection()
    assert cfg.robust == "auto" and cfg.clip_multiple == 1.0
    for bad in ({"robust": "median"}, {"clip_multiple": 0.5}, {"clip_multiple": float("nan")}):
        with pytest.raises(ConfigError, match="diloco"):
            DilocoSection(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the property


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_poisoned_round_moves_theta_no_further_than_a_clean_round(n: int, poison: str) -> None:
    """‖mean‖ of a round with one poisoned replica <= ‖mean‖ of the same round clean, when the honest
    updates have equal norms; with unequal norms, within their spread (max/min: a x1e4 part is clipped
    to the honest reference, which may exceed the norm its sender would have sent), and never above the
    largest honest update. The plain mean shows the same poison moving θ_global far away."""
    for seed in range(12):
        g = torch.Generator().manual_seed(1000 + seed)
        for equal in (True, False):
            parts = honest_parts(n, seed, equal_norms=equal)
            norms = [float(p.norm()) for p in parts]
            spread = max(norms) / min(norms)
            for reference in (None, float(torch.tensor(norms).median())):   # warm-up, then a running median
                clean = robust_mean(parts, clip_multiple=1.0, reference=reference, trim=True).mean
                poisoned_parts = [*parts[:-1], POISONS[poison](parts[-1], g)]
                poisoned = robust_mean(poisoned_parts, clip_multiple=1.0, reference=reference, trim=True).mean
                assert clean is not None and poisoned is not None
                assert poisoned.norm() <= clean.norm() * spread * (1 + 1e-5), (seed, equal, reference)
                assert poisoned.norm() <= max(norms[:-1]) * (1 + 1e-5)
    if poison == "x1e4":
        plain = robust_mean([*parts[:-1], parts[-1] * 1e4]).mean
        assert plain is not None and plain.norm() > 100 * max(norms)


# --------------------------------------------------------------------------- over real gRPC


def equal_shard_norms(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Honest parts whose every shard (one per replica, as the owners cut them) has the same norm, so the
    property holds shard by shard without the spread factor."""
    out = [p.clone() for p in parts]
    for start, end in shard_bounds(parts[0].numel(), len(parts)):
        for p in out:
            p[start:end] *= 5.0 / p[start:end].norm()
    return out


async def _grpc_round(values: list[torch.Tensor], reducers: list[ShardReducer], round_id: int,
                      addresses: list[str]) -> list[torch.Tensor]:
    pools = [ChannelPool(TOKEN) for _ in values]
    ids = [f"r{i}" for i in range(len(values))]
    try:
        results = await asyncio.gather(*(
            allreduce_mean(addresses, i, v, round_id=round_id, codec="fp32", timeout_s=2.0, reducer=reducers[i],
                           channels=pools[i], sender_id=ids[i], participants=ids) for i, v in enumerate(values)))
    finally:
        for pool in pools:
            await pool.close()
    for _, stats in results:
        assert not stats.lost_shards, stats.errors
    return [mean for mean, _ in results]


@pytest.mark.parametrize("n", [2, 3])
def test_poisoned_replica_over_grpc_owner_path(n: int) -> None:
    """Real ShardReducers (roster required) over loopback: five clean rounds warm the running median
    up, then each poison in turn; every replica applies the same mean, no further from θ_global than
    the clean round, and each owner records whom it clipped."""

    async def main() -> None:
        reducers = [ShardReducer(timeout_s=2.0, node_id=f"r{i}", robust="auto", require_roster=True)
                    for i in range(n)]
        servers = [await start_reduce_server(r, TOKEN) for r in reducers]
        addresses = [a for _, a in servers]
        g = torch.Generator().manual_seed(7)
        try:
            round_id = 0
            for warm in range(5):
                round_id += 1
                await _grpc_round(equal_shard_norms(honest_parts(n, warm)), reducers, round_id, addresses)
            assert all(r.history.reference((0, 0, n, i)) is not None for i, r in enumerate(reducers))
            assert sum(r.rejected_total for r in reducers) == 0      # honest rounds record nobody
            for poison in sorted(POISONS):
                parts = equal_shard_norms(honest_parts(n, 100 + round_id))
                round_id += 1
                clean = await _grpc_round(parts, reducers, round_id, addresses)
                round_id += 1
                poisoned = await _grpc_round([*parts[:-1], POISONS[poison](parts[-1], g)], reducers, round_id,
                                             addresses)
                assert all(torch.equal(poisoned[0], m) for m in poisoned)   # one θ_global for the stage
                assert poisoned[0].norm() <= clean[0].norm() * (1 + 1e-5), poison
            # the x1e4 and noise parts were recorded against the poisoner by every owner
            poisoner = f"r{n - 1}"
            for r in reducers:
                assert r.rejected_by_peer.get(poisoner, 0) >= 2, r.rejected_by_peer
                assert set(r.rejected_by_peer) == {poisoner}
                assert r.last_rejection is not None and r.last_rejection.peer == poisoner
        finally:
            for server, _ in servers:
                await server.stop(0)

    asyncio.run(main())


async def _call(address: str, header: node_pb2.ShardHeader, values: torch.Tensor | None) -> grpc.StatusCode:
    """One raw ReduceShard call; the status it ended with."""
    from lowband.protocols.chunking import iter_chunks
    from lowband.protocols.codec import encode

    pool = ChannelPool(TOKEN)
    try:
        if values is None:
            requests = [node_pb2.ShardChunk(header=header)]
        else:
            requests = [node_pb2.ShardChunk(header=header if i == 0 else None, chunk=chunk)
                        for i, chunk in enumerate(iter_chunks(encode(values, "fp32"), 1 << 16))]
        call = pool.stub(address).ReduceShard(iter(requests), timeout=5.0, metadata=(("lowband-token", TOKEN),))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    finally:
        await pool.close()


def test_only_the_rounds_participants_may_send_parts() -> None:
    async def main() -> None:
        owner = ShardReducer(timeout_s=0.5, node_id="r0", robust="auto", require_roster=True)
        server, address = await start_reduce_server(owner, TOKEN)
        try:
            owner.expect_round(5, 0, 0, ["r0", "r1"])

            def header(**kw: object) -> node_pb2.ShardHeader:
                fields = {"round_id": 5, "stage": 0, "fragment": 0, "shard_index": 0, "num_shards": 2,
                          "sender_id": "r1", "total_numel": 8}
                fields.update(kw)
                return node_pb2.ShardHeader(**fields)  # type: ignore[arg-type]

            part = torch.full((4,), 1e6)
            denied = grpc.StatusCode.PERMISSION_DENIED
            assert await _call(address, header(sender_id="mallory"), part) == denied      # not a participant
            assert await _call(address, header(sender_id="mallory", abstain=True), None) == denied
            assert await _call(address, header(shard_index=1), part) == denied            # r1's own shard
            assert await _call(address, header(num_shards=3), part) == denied             # another layout
            assert await _call(address, header(round_id=6), part) == denied               # no such round for us
            assert not owner._rounds and owner.rejected_total == 0                        # nothing changed
            # the participants' round goes on untouched: r1's part and r0's own part average
            r1 = asyncio.create_task(_call(address, header(), torch.tensor([2.0, 2.0, 2.0, 2.0])))
            res = await owner.reduce_local(header(sender_id="r0"), torch.tensor([4.0, 0.0, 0.0, 0.0]), "fp32")
            assert await r1 == grpc.StatusCode.OK
            assert res.contributors == 2 and res.mean is not None
            assert res.mean.tolist() == [3.0, 1.0, 1.0, 1.0]   # equal norms (4): nothing clipped
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_late_roster_is_waited_for() -> None:
    """A peer's part may arrive before this node's own JoinSyncRound answered: the owner waits for it."""

    async def main() -> None:
        owner = ShardReducer(timeout_s=2.0, node_id="r0", require_roster=True)
        server, address = await start_reduce_server(owner, TOKEN)
        try:
            header = node_pb2.ShardHeader(round_id=1, shard_index=0, num_shards=2, sender_id="r1", total_numel=2)
            call = asyncio.create_task(_call(address, header, torch.tensor([1.0])))
            await asyncio.sleep(0.3)
            owner.expect_round(1, 0, 0, ["r0", "r1"])
            own = node_pb2.ShardHeader(round_id=1, shard_index=0, num_shards=2, sender_id="r0", total_numel=2)
            res = await owner.reduce_local(own, torch.tensor([3.0]), "fp32")
            assert await call == grpc.StatusCode.OK and res.contributors == 2
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_status_shows_rejected_peers() -> None:
    node = {"node_id": "n-a", "address": "127.0.0.1:1", "stage": 0, "state": "alive", "heartbeat_age_s": 0.1,
            "tokens_per_s": 1.0, "loss": 2.0, "bytes_sent": 0, "bytes_received": 0, "memory_bytes": 0,
            "rejected_updates": 3, "rejected_peers": {"n-bad": 3},
            "last_rejection": "round 4 stage 0 fragment 0: peer n-bad: norm 1e+04 above 3 x the reference 1"}
    text = format_status({"coordinator": "c", "epoch": 1, "outer_step": 4, "stage_coverage": {"0": 2},
                          "nodes": [node, {**node, "node_id": "n-b", "rejected_updates": 0, "rejected_peers": {},
                                           "last_rejection": ""}], "events": []})
    assert "rejected pseudo-gradient parts" in text and "n-bad x3" in text and "last: round 4" in text
    assert text.count("n-bad x") == 1


def test_fault_poison_spec() -> None:
    from lowband.node.sync.fault import parse_poison, poison_from_env

    delta = torch.tensor([1.0, -2.0])
    assert parse_poison("") is None and poison_from_env({}) is None
    scale, sign, noise = parse_poison("scale:1e4"), parse_poison("sign"), parse_poison("noise:1e3")
    assert scale is not None and scale(delta).tolist() == [1e4, -2e4]
    assert sign is not None and sign(delta).tolist() == [-1.0, 2.0]
    assert noise is not None and noise(delta).shape == delta.shape and float(noise(delta).abs().max()) > 10
    for bad in ("scale", "scale:x", "scale:-1", "noise:inf", "sign:2", "flip"):
        with pytest.raises(ValueError, match="LOWBAND_FAULT_POISON"):
            parse_poison(bad)


def test_daemon_backend_takes_robust_settings_and_requires_the_roster() -> None:
    from lowband.node.sync.averaging_backend import GrpcBackend
    from lowband.protocols.config import RunConfig, apply_overrides

    cfg = apply_overrides(RunConfig(), ["diloco.robust=clip", "diloco.clip_multiple=2"]).diloco
    reducer = ShardReducer.from_config(cfg, node_id="n1")
    assert (reducer.robust, reducer.clip_multiple, reducer.require_roster) == ("clip", 2.0, False)
    backend = GrpcBackend(DilocoSection(), stage=0, node_id="n1", token="t")
    assert backend.reducer is not None
    assert (backend.reducer.robust, backend.reducer.clip_multiple, backend.reducer.require_roster) == ("auto", 1.0, True)
