"""Streaming DiLoCo over real gRPC (torchft style): replicas as asyncio tasks, each with a
ReduceShard server on 127.0.0.1:0, a fault injector keyed by (replica, step), and the
check that every surviving replica ends with identical θ_global and outer state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
import torch
from reduce_servers import start_reduce_server
from torch import nn

from lowband.node.sync.diloco import StreamingDiLoCo, SyncJob, state_from_parts, state_to_parts
from lowband.node.sync.error_feedback import ErrorFeedback
from lowband.node.sync.grpc_averager import AllReduceStats, ChannelPool, ShardReducer, allreduce_mean
from lowband.protocols import node_pb2, node_pb2_grpc, tensor_pb2
from lowband.protocols.codec import decode, encode, payload_checksum, relative_error
from lowband.protocols.config import ConfigError, DilocoSection, RunConfig, apply_overrides
from lowband.protocols.sparse import params_of

torch.set_num_threads(1)
TOKEN = "diloco-test-token"
pytestmark = pytest.mark.timeout(60)


async def start_server(reducer: ShardReducer) -> tuple[grpc.aio.Server, str]:
    return await start_reduce_server(reducer, TOKEN)


class TinyStage(nn.Module):
    def __init__(self, n_blocks: int = 4, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)  # every replica starts from the same weights
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(n_blocks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


# --------------------------------------------------------------------------- harness


class FlakyPool(ChannelPool):
    """Breaks the first `breaks` calls (to a closed port) before behaving."""

    def __init__(self, token: str, breaks: int) -> None:
        super().__init__(token)
        self.breaks = breaks

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        if self.breaks > 0:
            self.breaks -= 1
            return super().stub("127.0.0.1:1")
        return super().stub(address)


@dataclass
class Replica:
    idx: int
    diloco: StreamingDiLoCo
    opt: torch.optim.Optimizer
    reducer: ShardReducer
    server: grpc.aio.Server
    address: str
    channels: ChannelPool
    x: torch.Tensor
    y: torch.Tensor
    alive: bool = True
    step: int = 0
    stats: list[AllReduceStats] = field(default_factory=list)


@dataclass
class Faults:
    """Fault injector keyed by (replica, step)."""

    crash: set[tuple[int, int]] = field(default_factory=set)        # die right before the exchange
    delay: dict[tuple[int, int], float] = field(default_factory=dict)
    flaky: dict[tuple[int, int], int] = field(default_factory=dict)  # first k calls break
    nan_part: set[tuple[int, int]] = field(default_factory=set)     # a hostile encoder sends NaN
    scale_part: dict[tuple[int, int], float] = field(default_factory=dict)


async def make_replica(idx: int, cfg: DilocoSection) -> Replica:
    model = TinyStage()
    reducer = ShardReducer(timeout_s=cfg.peer_timeout_s, reject_norm_ratio=cfg.reject_norm_ratio,
                           node_id=f"r{idx}", sparse=params_of(cfg))
    server, address = await start_server(reducer)
    g = torch.Generator().manual_seed(100 + idx)  # each replica its own data shard
    return Replica(
        idx=idx,
        diloco=StreamingDiLoCo(model, cfg),
        opt=torch.optim.SGD(model.parameters(), lr=0.2),
        reducer=reducer,
        server=server,
        address=address,
        channels=ChannelPool(TOKEN),
        x=torch.randn(16, 6, generator=g),
        y=torch.randn(16, 6, generator=g) * 0.5,
    )


def nan_encoder(t: torch.Tensor, codec: str) -> tensor_pb2.Tensor:
    """A hostile or broken peer: a well-formed fp32 message full of NaN (valid checksum)."""
    payload = torch.full((t.numel(),), float("nan"), dtype=torch.float32).numpy().tobytes()
    return tensor_pb2.Tensor(dtype="float32", shape=list(t.shape), codec="fp32", payload=payload,
                             raw_size=len(payload), checksum=payload_checksum(b"", payload))


def inner_step(rep: Replica) -> None:
    rep.opt.zero_grad()
    loss = ((rep.diloco.module(rep.x) - rep.y) ** 2).mean()
    loss.backward()
    rep.opt.step()


async def exchange(rep: Replica, job: SyncJob, members: list[Replica], faults: Faults, codec: str,
                   timeout_s: float) -> tuple[torch.Tensor, AllReduceStats]:
    key = (rep.idx, job.step)
    if key in faults.delay:
        await asyncio.sleep(faults.delay[key])
    delta, contribute, encoder = job.delta, job.finite, encode
    if key in faults.nan_part:
        encoder = nan_encoder
    if key in faults.scale_part:
        delta = delta * faults.scale_part[key]
    channels = FlakyPool(TOKEN, faults.flaky[key]) if key in faults.flaky else rep.channels
    try:
        avg, stats = await allreduce_mean(
            [m.address for m in members], members.index(rep), delta,
            round_id=job.step, codec=codec, timeout_s=timeout_s, reducer=rep.reducer, channels=channels,
            fragment=job.fragment, outer_step=job.outer_step, sender_id=f"r{rep.idx}", contribute=contribute,
            encoder=encoder, sparse=job.sparse)
    finally:
        if channels is not rep.channels:
            await channels.close()
    rep.stats.append(stats)
    return avg, stats


async def run_replica(rep: Replica, steps: range, members_at: Callable[[int], list[Replica]], faults: Faults,
                      codec: str, timeout_s: float, step_done: dict[int, asyncio.Event] | None = None) -> None:
    tasks: dict[int, asyncio.Task] = {}
    for step in steps:
        await asyncio.to_thread(inner_step, rep)
        rep.step = step
        for job in rep.diloco.due_merges(step):
            avg, stats = await tasks.pop(job.step)
            rep.diloco.finish_sync(job, avg, stats.valid)
        if (rep.idx, step) in faults.crash:
            rep.alive = False
            for task in tasks.values():
                task.cancel()
            await rep.server.stop(0)
            return
        job = rep.diloco.begin_sync(step)
        if job is not None:
            tasks[step] = asyncio.ensure_future(exchange(rep, job, members_at(step), faults, codec, timeout_s))
        if step_done is not None:
            step_done[step].set()
        await asyncio.sleep(0)
    for job in list(rep.diloco.pending):  # drain: merge whatever is still in flight
        avg, stats = await tasks.pop(job.step)
        rep.diloco.finish_sync(job, avg, stats.valid)


async def shutdown(reps: list[Replica]) -> None:
    for rep in reps:
        await rep.channels.close()
        await rep.server.stop(0)


def assert_same_outer_state(reps: list[Replica]) -> None:
    ref = reps[0].diloco
    for rep in reps[1:]:
        d = rep.diloco
        for name, t in ref.global_params.items():
            torch.testing.assert_close(d.global_params[name], t, rtol=0, atol=0, msg=f"θ_global {name}")
        assert d.outer.steps == ref.outer.steps
        assert d.outer.buffers.keys() == ref.outer.buffers.keys()
        for p, bufs in ref.outer.buffers.items():
            for name, t in bufs.items():
                torch.testing.assert_close(d.outer.buffers[p][name], t, rtol=0, atol=0, msg=f"momentum {p}/{name}")


def cfg(**kw: object) -> DilocoSection:
    base = dict(inner_steps=4, fragments=2, overlap=1, alpha=0.5, outer_lr=0.4, outer_momentum=0.9,
                codec="fp4", peer_timeout_s=2.0)
    base.update(kw)
    return DilocoSection(**base)  # type: ignore[arg-type]


async def simulate(n: int, steps: int, c: DilocoSection, faults: Faults) -> list[Replica]:
    reps = [await make_replica(i, c) for i in range(n)]
    crash_step = {r: s for r, s in faults.crash}

    def members_at(step: int) -> list[Replica]:
        # the coordinator learns of a crash only after the round it died in
        return [r for r in reps if crash_step.get(r.idx, 10**9) >= step]

    try:
        await asyncio.gather(*(run_replica(r, range(1, steps + 1), members_at, faults, c.codec, c.peer_timeout_s)
                               for r in reps))
    finally:
        await shutdown(reps)
    return reps


# --------------------------------------------------------------------------- tests


def test_grpc_mean_matches_in_process_reference() -> None:
    """fp32 codec: θ_global after gRPC averaging equals averaging the Δs in process."""
    c = cfg(codec="fp32")
    reps = asyncio.run(simulate(3, 9, c, Faults()))
    assert_same_outer_state(reps)
    assert all(not s.lost_shards and s.contributors == [3, 3, 3] for r in reps for s in r.stats)

    # reference: the same replicas and data, mean taken directly
    models = [TinyStage() for _ in range(3)]
    dilos = [StreamingDiLoCo(m, c) for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.2) for m in models]
    pending: dict[int, list[SyncJob]] = {}
    for step in range(1, 10):
        for i in range(3):
            opts[i].zero_grad()
            ((models[i](reps[i].x) - reps[i].y) ** 2).mean().backward()
            opts[i].step()
        for s in [s for s in pending if s + c.overlap <= step]:
            jobs = pending.pop(s)
            mean = sum(j.delta for j in jobs) / 3
            for d, j in zip(dilos, jobs, strict=True):
                d.finish_sync(j, mean)
        jobs = [d.begin_sync(step) for d in dilos]
        if jobs[0] is not None:
            pending[step] = jobs
    # tolerance: the owner sums in sender order, the reference in replica order (same order here)
    for name, t in dilos[0].global_params.items():
        torch.testing.assert_close(reps[0].diloco.global_params[name], t, rtol=1e-6, atol=1e-7)
    assert dilos[0].outer.steps == reps[0].diloco.outer.steps == {0: 2, 1: 2}


def test_crash_mid_run_costs_one_shard_never_a_hang() -> None:
    c = cfg(peer_timeout_s=0.5)
    faults = Faults(crash={(2, 4)})  # replica 2 dies right before its exchange at step 4
    reps = asyncio.run(simulate(3, 10, c, faults))
    survivors = [r for r in reps if r.alive]
    assert [r.idx for r in survivors] == [0, 1]
    assert_same_outer_state(survivors)
    round4 = [s for r in survivors for s in r.stats if len(s.contributors) == 3 and s.lost_shards]
    assert len(round4) == 2 and all(s.lost_shards == [2] for s in round4)
    assert all(s.contributors[:2] == [2, 2] for s in round4)  # the dead part is simply missing
    later = [s for r in survivors for s in r.stats[-2:]]
    assert all(len(s.contributors) == 2 and not s.lost_shards for s in later)


def test_sparse_rounds_with_a_crashed_peer_leave_identical_theta_global() -> None:
    """codec "sparse": replicas select different entries, owners re-sparsify the mean; after rounds
    with a peer that died mid-run the survivors hold bit-identical θ_global, and what they sent to
    the dead owner's shard is owed again in their error feedback."""
    c = cfg(codec="sparse", outer_momentum=0.0, outer_lr=1.0, sparse_chunk=8, sparse_topk=2, peer_timeout_s=0.5)
    faults = Faults(crash={(2, 4)})
    reps = asyncio.run(simulate(3, 10, c, faults))
    survivors = [r for r in reps if r.alive]
    assert_same_outer_state(survivors)
    init = StreamingDiLoCo(TinyStage(), c).global_params
    moved = sum(int((survivors[0].diloco.global_params[n] != t).sum()) for n, t in init.items())
    assert 0 < moved < sum(t.numel() for t in init.values())   # sparse: some entries moved, not all
    round4 = [s for r in survivors for s in r.stats if len(s.contributors) == 3 and s.lost_shards]
    assert len(round4) == 2 and all(s.lost_shards == [2] for s in round4)
    for rep in survivors:   # the error feedback is per replica (own selections), kept per fragment
        assert set(rep.diloco.error.keys()) == {0, 1}
        assert all(bool(torch.isfinite(rep.diloco.error.residual(p)).all()) for p in (0, 1))


def test_failed_exchange_is_retried_and_delayed_part_still_gets_the_mean() -> None:
    c = cfg(peer_timeout_s=0.6)
    faults = Faults(flaky={(1, 2): 2}, delay={(2, 4): 1.0})
    reps = asyncio.run(simulate(3, 8, c, faults))
    assert_same_outer_state(reps)
    assert all(not s.lost_shards for r in reps for s in r.stats)
    # the delayed replica's parts missed the owners' window; the others averaged without it
    r0_round4 = reps[0].stats[1]
    assert r0_round4.contributors == [2, 2, 2]


def test_non_finite_and_outlier_parts_are_dropped_by_owners() -> None:
    c = cfg(reject_norm_ratio=3.0)
    faults = Faults(nan_part={(1, 2)}, scale_part={(2, 4): 1e4})
    reps = asyncio.run(simulate(3, 6, c, faults))
    assert_same_outer_state(reps)
    for d in (r.diloco for r in reps):
        assert all(torch.isfinite(t).all() for t in d.global_params.values())
    nan_stats, huge_stats = reps[1].stats[0], reps[2].stats[1]
    assert set(nan_stats.refused) == {0, 2} and "non-finite" in nan_stats.refused[0]
    assert set(huge_stats.refused) == {0, 1} and "norm" in huge_stats.refused[0]
    assert reps[0].stats[1].contributors == [2, 2, 2]


def test_newcomer_copies_state_then_contributes() -> None:
    c = cfg(peer_timeout_s=2.0)

    async def main() -> list[Replica]:
        reps = [await make_replica(i, c) for i in range(3)]
        join_after = 5  # odd: no exchange in flight on the old replicas
        done = {s: asyncio.Event() for s in range(1, 13)}

        def members_at(step: int) -> list[Replica]:
            return reps if step > join_after else reps[:2]

        async def newcomer() -> None:
            await done[join_after].wait()
            # what the daemon does over GetState: replica 0's θ_global + outer state
            parts = state_to_parts(reps[0].diloco.state_dict())
            reps[2].diloco.load_state_dict(state_from_parts(parts, reps[2].diloco.fragments))
            await run_replica(reps[2], range(join_after + 1, 13), members_at, Faults(), c.codec, c.peer_timeout_s)

        try:
            await asyncio.gather(
                run_replica(reps[0], range(1, 13), members_at, Faults(), c.codec, c.peer_timeout_s, done),
                run_replica(reps[1], range(1, 13), members_at, Faults(), c.codec, c.peer_timeout_s),
                newcomer())
        finally:
            await shutdown(reps)
        return reps

    reps = asyncio.run(main())
    assert_same_outer_state(reps)
    assert reps[2].stats and all(s.contributors == [3, 3, 3] for s in reps[2].stats)
    assert reps[0].diloco.outer.steps == {0: 3, 1: 3}


def test_two_replicas_over_grpc_hand_computed_and_wrong_token() -> None:
    async def main() -> None:
        reducers = [ShardReducer(timeout_s=1.0, node_id=f"r{i}") for i in range(2)]
        servers = [await start_server(r) for r in reducers]
        peers = [a for _, a in servers]
        pools = [ChannelPool(TOKEN), ChannelPool(TOKEN)]
        try:
            vals = [torch.full((5,), 0.2), torch.full((5,), 0.4)]
            outs = await asyncio.gather(*(
                allreduce_mean(peers, i, vals[i], round_id=1, codec="fp32", timeout_s=1.0, reducer=reducers[i],
                               channels=pools[i], sender_id=f"r{i}") for i in range(2)))
            for avg, stats in outs:
                torch.testing.assert_close(avg, torch.full((5,), 0.3))
                assert stats.contributors == [2, 2] and stats.bytes_sent > 0
            # fp4: lossy, but both replicas hold exactly the same numbers
            g = torch.Generator().manual_seed(3)
            vals = [torch.randn(1000, generator=g) for _ in range(2)]
            outs = await asyncio.gather(*(
                allreduce_mean(peers, i, vals[i], round_id=2, codec="fp4", timeout_s=1.0, reducer=reducers[i],
                               channels=pools[i], sender_id=f"r{i}") for i in range(2)))
            torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
            assert float((outs[0][0] - (vals[0] + vals[1]) / 2).norm()) < 0.5 * float(vals[0].norm())
            # wrong token: refused before any handler, the owner's round is untouched
            bad = ChannelPool("wrong-token")
            avg, stats = await allreduce_mean(peers, 0, vals[0], round_id=3, codec="fp32", timeout_s=0.3,
                                              reducer=reducers[0], channels=bad, sender_id="r0")
            await bad.close()
            assert stats.lost_shards == [1] and "UNAUTHENTICATED" in stats.errors[1]
            assert not any(k[0] == 3 for k in reducers[1]._rounds)
        finally:
            for pool in pools:
                await pool.close()
            for server, _ in servers:
                await server.stop(0)

    asyncio.run(main())


def test_malformed_header_is_invalid_argument() -> None:
    async def main() -> None:
        reducer = ShardReducer(timeout_s=0.5, node_id="r0")
        server, address = await start_server(reducer)
        pool = ChannelPool(TOKEN)
        try:
            stub = pool.stub(address)
            bad = node_pb2.ShardChunk(header=node_pb2.ShardHeader(round_id=1, shard_index=5, num_shards=2,
                                                                  sender_id="x", total_numel=10))
            call = stub.ReduceShard(iter([bad]), timeout=2.0, metadata=(("lowband-token", TOKEN),))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert not reducer._rounds
        finally:
            await pool.close()
            await server.stop(0)

    asyncio.run(main())


def test_reducer_from_config_and_error_feedback_setting() -> None:
    run = apply_overrides(RunConfig(), ["diloco.error_feedback=true", "diloco.reject_norm_ratio=4",
                                        "diloco.peer_timeout_s=3"])
    reducer = ShardReducer.from_config(run.diloco, node_id="n1")
    assert (reducer.error_feedback, reducer.reject_norm_ratio, reducer.timeout_s) == (True, 4.0, 3.0)
    with pytest.raises(ConfigError, match=r"diloco\.error_feedback"):
        apply_overrides(RunConfig(), ["diloco.error_feedback=maybe"])


def test_error_feedback_carries_quantization_error_to_the_next_round() -> None:
    async def main(error_feedback: bool) -> float:
        reducers = [ShardReducer(timeout_s=1.0, node_id=f"r{i}", error_feedback=error_feedback) for i in range(2)]
        servers = [await start_server(r) for r in reducers]
        peers = [a for _, a in servers]
        pools = [ChannelPool(TOKEN), ChannelPool(TOKEN)]
        g = torch.Generator().manual_seed(7)
        x = torch.randn(512, generator=g)
        total = torch.zeros(512)
        try:
            for rnd in range(4):  # the same Δ four times: without EF the fp4 error repeats, with EF it cancels
                outs = await asyncio.gather(*(
                    allreduce_mean(peers, i, x, round_id=rnd, codec="fp4", timeout_s=1.0, reducer=reducers[i],
                                   channels=pools[i], sender_id=f"r{i}") for i in range(2)))
                torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
                total += outs[0][0]
            if error_feedback:
                residual = reducers[0].part_feedback.residual((0, 0))
                assert residual is not None and residual.shape == x.shape
                assert reducers[1].reply_feedback.residual((0, 0, 1)) is not None   # its reply to everybody
        finally:
            for pool in pools:
                await pool.close()
            for server, _ in servers:
                await server.stop(0)
        return float((total - 4 * x).norm() / (4 * x).norm())

    without, with_ef = asyncio.run(main(False)), asyncio.run(main(True))
    assert with_ef < 0.5 * without, (with_ef, without)


@pytest.mark.parametrize("name", ["int8", "int4", "fp8", "fp4", "bf16"])
def test_error_feedback_bounds_the_accumulated_error_of_repeated_sends(name: str) -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(7)) * 1e-3
    sends = 30
    ef = ErrorFeedback()
    total_ef = torch.zeros_like(x)
    total_plain = torch.zeros_like(x)
    for _ in range(sends):
        meant = ef.compensate("w", x)
        sent = decode(encode(meant, name))
        ef.store("w", meant, sent)
        total_ef += sent
        total_plain += decode(encode(x, name))
    target = x * sends
    err_ef = relative_error(target, total_ef)
    err_plain = relative_error(target, total_plain)
    # Without feedback the same rounding error repeats every send; with it the running
    # sum stays within one send's error of the target, so it is several times smaller.
    assert err_ef < err_plain / 4, (err_ef, err_plain)


def test_error_feedback_drops_a_residual_whose_stream_changed_shape_and_restores_lost_spans() -> None:
    ef = ErrorFeedback()
    fresh = torch.ones(4)
    assert ef.compensate("k", fresh) is fresh and ef.residual("k") is None
    ef.store("k", torch.full((4,), 2.0), torch.ones(4))
    torch.testing.assert_close(ef.compensate("k", torch.zeros(4)), torch.ones(4))
    before = ef.residual("k")
    ef.store("k", torch.full((4,), 5.0), torch.ones(4))        # residual 4 everywhere
    ef.restore("k", 1, 3, before)                              # elements 1..2 were never delivered
    torch.testing.assert_close(ef.residual("k"), torch.tensor([4.0, 1.0, 1.0, 4.0]))
    ef.restore("k", 0, 1, None)                                # no residual before that send: none now
    torch.testing.assert_close(ef.residual("k"), torch.tensor([0.0, 1.0, 1.0, 4.0]))
    shorter = torch.zeros(3)
    assert ef.compensate("k", shorter) is shorter and ef.residual("k") is None
