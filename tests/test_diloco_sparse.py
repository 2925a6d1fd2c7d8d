"""The sparse outer update (codec "sparse", SparseLoCo): selection, quantisation, wire form and its
validation, the owner's reduce rule on a hand-computed two-replica round over real gRPC, and the
error feedback travelling with the replica state."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
import torch
from node_cluster import TOKEN as NODE_TOKEN
from node_cluster import start_node
from reduce_servers import start_reduce_server
from torch import nn

from lowband.node.pipeline.transport import Transport
from lowband.node.recovery.obtain import obtain_weights
from lowband.node.service import StateSnapshot
from lowband.node.sync.diloco import StreamingDiLoCo, state_from_parts, state_to_parts
from lowband.node.sync.grpc_averager import ChannelPool, ShardReducer, allreduce_mean
from lowband.node.train.model import ModelConfig, build_stage, init_stage
from lowband.protocols import coordinator_pb2, node_pb2, node_pb2_grpc
from lowband.protocols.chunking import iter_chunks
from lowband.protocols.codec import payload_checksum
from lowband.protocols.config import ConfigError, DilocoSection, RunConfig, apply_overrides
from lowband.protocols.errors import ValidationError
from lowband.protocols.rpc import token_metadata
from lowband.protocols.sparse import SparseParams, reduce_shard, select
from lowband.protocols.sparse_codec import decode_sparse, encode_sparse
from lowband.sim.config import load_sim_config

torch.set_num_threads(1)
TOKEN = "sparse-test-token"
pytestmark = pytest.mark.timeout(60)

# the hand-computed round: 2 replicas, one 8-element fragment, chunks of 4, top-2, 1-bit values
DELTA_A = [4.0, -1.0, 0.5, 2.0, 0.0, 0.0, -3.0, 1.0]
DELTA_B = [1.0, 0.0, -2.0, 0.0, 0.5, 0.25, -1.0, 3.0]


def sparse_cfg(**kw: object) -> DilocoSection:
    base = dict(inner_steps=1, fragments=1, overlap=0, alpha=0.0, outer_lr=1.0, outer_momentum=0.0,
                codec="sparse", peer_timeout_s=2.0, sparse_chunk=4, sparse_topk=2, sparse_bits=1,
                sparse_error_decay=1.0, sparse_reply_topk=0)
    base.update(kw)
    return DilocoSection(**base)  # type: ignore[arg-type]


class Flat(nn.Module):
    """One 8-element parameter: θ_global starts at 0, so θ_local = -Δ gives the Δ we want."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(8))


def replica_with_delta(delta: list[float], c: DilocoSection) -> StreamingDiLoCo:
    module = Flat()
    diloco = StreamingDiLoCo(module, c)
    with torch.no_grad():
        module.w.copy_(-torch.tensor(delta))
    return diloco


# --------------------------------------------------------------------------- selection and quantisation


def test_select_keeps_the_top_entries_of_each_chunk_with_one_level_per_chunk() -> None:
    sel = select(torch.tensor(DELTA_A), SparseParams(chunk=4, topk=2, bits=1))
    assert sel.indices.tolist() == [0, 3, 6, 7]
    # chunk 0 keeps 4 and 2 (level: their mean magnitude 3), chunk 1 keeps -3 and 1 (level 2)
    assert sel.dense().tolist() == [3.0, 0.0, 0.0, 3.0, 0.0, 0.0, -2.0, 2.0]


def test_two_bit_levels_split_the_kept_magnitudes_at_their_midpoint() -> None:
    x = torch.tensor([5.0, -4.0, 1.0, 0.1, -1.5, 0.0, 0.0, 0.0])
    sel = select(x, SparseParams(chunk=8, topk=4, bits=2))
    assert sel.indices.tolist() == [0, 1, 2, 4]
    # kept magnitudes 5, 4, 1, 1.5: midpoint 3; low level mean(1, 1.5), high level mean(5, 4)
    assert sel.dense().tolist() == [4.5, -4.5, 1.25, 0.0, -1.25, 0.0, 0.0, 0.0]


def test_exact_zeros_and_a_short_last_chunk_are_handled() -> None:
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 7.0])
    sel = select(x, SparseParams(chunk=4, topk=2, bits=2))
    assert sel.indices.tolist() == [4]       # zeros never kept; the 1-element chunk keeps its one entry
    assert sel.dense().tolist() == [0.0, 0.0, 0.0, 0.0, 7.0]


# --------------------------------------------------------------------------- the wire


@pytest.mark.parametrize("bits", [1, 2])
def test_wire_form_is_lossless_for_any_shard_and_compact(bits: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g)
    sel = select(x, SparseParams(chunk=4096, topk=64, bits=bits))
    dense = sel.dense()
    for start, end in [(0, 20000), (0, 5000), (5000, 10000), (10001, 20000), (300, 300)]:
        msg = encode_sparse(sel, start, end)
        assert torch.equal(decode_sparse(msg, expected_shape=(end - start,)), dense[start:end])
    whole = encode_sparse(sel)
    # Rice-coded gaps at 1.6% density: under 8 bits a position, plus the value bits, levels and framing
    assert whole.ByteSize() <= sel.nnz * (8 + bits) / 8 + 5 * 4 * 2 + 64


def _corrupt(msg: object, **fields: object) -> object:
    out = type(msg)()
    out.CopyFrom(msg)
    for k, v in fields.items():
        if k == "shape":
            del out.shape[:]
            out.shape.extend(v)   # type: ignore[arg-type]
        else:
            setattr(out, k, v)
    if "checksum" not in fields:
        out.checksum = payload_checksum(out.scales, out.payload)
    return out


def test_malformed_sparse_messages_are_refused_with_a_clear_error() -> None:
    sel = select(torch.tensor(DELTA_A), SparseParams(chunk=4, topk=2, bits=1))
    good = encode_sparse(sel)
    payload = bytearray(good.payload)
    # header (u8 bits, u32 phase, u32 nnz, u8 rice, u32 unary bits), then the unary gap quotients:
    # gaps 0, 2, 2, 0 at rice 0 are 0 | 110 | 110 | 0, one byte (LSB first) from offset 14
    assert payload[14] == 0b0011_0110
    lost_gap = bytearray(payload)
    lost_gap[14] = 0b0011_0111                             # the first gap's end bit flipped: 3 gaps
    nan_scales = torch.tensor([float("nan"), 2.0]).numpy().tobytes()
    cases = {
        "outside the shard": _corrupt(good, shape=[7]),   # entry 7 of a 7-element shard
        "unary section": _corrupt(good, payload=bytes(lost_gap)),
        "finite": _corrupt(good, scales=nan_scales),
        "payload holds": _corrupt(good, payload=bytes(payload) + b"\0" * 64, raw_size=len(payload) + 64),
        "checksum": _corrupt(good, checksum=good.checksum ^ 1),
        "chunk size": _corrupt(good, block_size=0),
        "scales hold": _corrupt(good, scales=good.scales + b"\0\0\0\0"),
        "value bits": _corrupt(good, payload=bytes([3]) + bytes(payload[1:])),
        "unary bits": _corrupt(good, payload=bytes(payload[:10]) + (99).to_bytes(4, "little") + bytes(payload[14:])),
    }
    for why, msg in cases.items():
        with pytest.raises(ValidationError, match=why):
            decode_sparse(msg, expected_shape=tuple(msg.shape))   # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="does not match"):
        decode_sparse(good, expected_shape=(9,))


# --------------------------------------------------------------------------- the reduce rule


def test_reduce_rule_hand_computed() -> None:
    p = SparseParams(chunk=4, topk=2, bits=1, error_decay=1.0)
    a = select(torch.tensor(DELTA_A), p).dense()
    b = select(torch.tensor(DELTA_B), p).dense()
    assert b.tolist() == [1.5, 0.0, -1.5, 0.0, 0.0, 0.0, -2.0, 2.0]
    out = reduce_shard([a[:4], b[:4]], None, p)
    assert out is not None
    _, sent, residual = out
    # mean [2.25, 0, -0.75, 1.5]: keeps 2.25 and 1.5 at their mean 1.875, owes the rest
    assert sent.tolist() == [1.875, 0.0, 0.0, 1.875]
    assert residual.tolist() == [0.375, 0.0, -0.75, -0.375]
    assert reduce_shard([], None, p) is None


def test_a_denser_reply_keeps_more_of_the_mean_hand_computed() -> None:
    """sparse_reply_topk: the owner re-selects the mean with its own k (parts stay at sparse_topk)."""
    p = SparseParams(chunk=4, topk=2, bits=1, error_decay=1.0, reply_topk=3)
    a = select(torch.tensor(DELTA_A), p).dense()
    b = select(torch.tensor(DELTA_B), p).dense()
    assert int((a != 0).sum()) == int((b != 0).sum()) == 4   # the parts: still 2 of every 4
    out = reduce_shard([a[:4], b[:4]], None, p)
    assert out is not None
    sel, sent, residual = out
    # mean [2.25, 0, -0.75, 1.5]: keeps all three non-zeros at their mean magnitude 1.5
    assert sel.indices.tolist() == [0, 2, 3]
    assert sent.tolist() == [1.5, 0.0, -1.5, 1.5]
    assert residual.tolist() == [0.75, 0.0, 0.75, 0.0]
    assert p.reply.topk == 3 and SparseParams(chunk=4, topk=2).reply.topk == 2
    assert SparseParams(chunk=4, topk=2, reply_topk=800).reply.topk == 4    # capped at the chunk
    with pytest.raises(ValueError, match="reply topk"):
        SparseParams(chunk=4, topk=2, reply_topk=-1)


async def _two_replica_round(c: DilocoSection) -> tuple[list[StreamingDiLoCo], list[ShardReducer]]:
    reps = [replica_with_delta(DELTA_A, c), replica_with_delta(DELTA_B, c)]
    reducers = [ShardReducer.from_config(c, node_id=f"r{i}") for i in range(2)]
    servers, peers, pools = [], [], [ChannelPool(TOKEN) for _ in range(2)]
    try:
        for reducer in reducers:
            server, address = await start_reduce_server(reducer, TOKEN)
            servers.append(server)
            peers.append(address)
        jobs = [d.begin_sync(1) for d in reps]
        results = await asyncio.gather(*(
            allreduce_mean(peers, i, job.delta, round_id=1, codec=c.codec, timeout_s=c.peer_timeout_s,
                           reducer=reducers[i], channels=pools[i], sender_id=f"r{i}", sparse=job.sparse)
            for i, job in enumerate(jobs)))
        for d, job, (mean, stats) in zip(reps, jobs, results, strict=True):
            assert stats.contributors == [2, 2] and not stats.lost_shards
            d.finish_sync(job, mean, stats.valid)
    finally:
        for pool in pools:
            await pool.close()
        for server in servers:
            await server.stop(0)
    return reps, reducers


def test_two_replicas_hand_computed_over_grpc() -> None:
    """Which entries each replica sends, which values every replica applies, the buffers afterwards."""
    c = sparse_cfg()
    (a, b), (owner0, owner1) = asyncio.run(_two_replica_round(c))
    applied = torch.tensor([1.875, 0.0, 0.0, 1.875, 0.0, 0.0, -2.0, 2.0])
    for d in (a, b):   # θ_global = 0 - lr · applied, bit-identical on both
        assert torch.equal(d.global_params["w"], -applied)
        assert torch.equal(d.params["w"].detach(), -applied)   # alpha 0: local = θ_global
    # each replica owes what its own selection left out
    assert a.error.residual(0).tolist() == [1.0, -1.0, 0.5, -1.0, 0.0, 0.0, -1.0, -1.0]
    assert b.error.residual(0).tolist() == [-0.5, 0.0, -0.5, 0.0, 0.5, 0.25, 1.0, 1.0]
    # each owner owes what its re-selection of the mean left out
    assert owner0.reply_feedback.residual((0, 0, 0)).tolist() == [0.375, 0.0, -0.75, -0.375]
    assert owner1.reply_feedback.residual((0, 0, 1)).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert a.outer.buffers.get(0, {}).keys() <= {"w"}   # no momentum state beyond plain SGD's


def test_outer_momentum_on_the_averaged_sparse_update_hand_computed() -> None:
    """sparse_outer_momentum: Nesterov momentum on the update every replica applies (identical on all,
    so θ_global stays identical); 0 (SparseLoCo, the default) is plain SGD."""
    c = sparse_cfg(outer_lr=0.5, sparse_outer_momentum=0.5)
    d = replica_with_delta(DELTA_A, c)
    g1 = torch.tensor([3.0, 0.0, 0.0, 3.0, 0.0, 0.0, -2.0, 2.0])   # the averaged reply, round 1
    job = d.begin_sync(1)
    assert job is not None
    d.finish_sync(job, g1)
    # buf = g1, update = g1 + 0.5·buf = 1.5·g1, θ_global = 0 - 0.5·1.5·g1
    assert torch.equal(d.global_params["w"], -0.75 * g1)
    g2 = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    job = d.begin_sync(2)
    assert job is not None
    d.finish_sync(job, g2)
    # buf = 0.5·g1 + g2, update = g2 + 0.5·buf = 0.25·g1 + 1.5·g2
    assert torch.allclose(d.global_params["w"], -0.75 * g1 - 0.5 * (0.25 * g1 + 1.5 * g2), atol=0, rtol=1e-7)
    assert set(d.outer.buffers[0]) == {"w"}
    plain = replica_with_delta(DELTA_A, sparse_cfg(outer_lr=0.5))
    job = plain.begin_sync(1)
    assert job is not None
    plain.finish_sync(job, g1)
    assert torch.equal(plain.global_params["w"], -0.5 * g1)


def test_lost_shard_and_failed_round_give_the_sent_values_back_to_the_error_buffer() -> None:
    c = sparse_cfg()
    d = replica_with_delta(DELTA_A, c)
    job = d.begin_sync(1)
    assert job is not None and job.delta.tolist() == [3.0, 0.0, 0.0, 3.0, 0.0, 0.0, -2.0, 2.0]
    valid = torch.tensor([True] * 4 + [False] * 4)          # shard 1's owner died
    d.finish_sync(job, job.delta.clone(), valid)
    # sent and applied in shard 0: owed what was left out; shard 1 never applied: owed all of Δ there
    assert d.error.residual(0).tolist() == [1.0, -1.0, 0.5, -1.0, 0.0, 0.0, -3.0, 1.0]
    job2 = d.begin_sync(2)
    assert job2 is not None
    before = d.error.residual(0).clone()
    d.finish_sync(job2, None)                                # the whole round failed
    assert torch.equal(d.error.residual(0), before + job2.delta)


def test_malformed_sparse_part_is_refused_by_the_owner_and_the_round_goes_on() -> None:
    c = sparse_cfg()

    async def run() -> tuple[node_pb2.ShardChunk, torch.Tensor]:
        reducer = ShardReducer.from_config(c, node_id="owner")
        server, address = await start_reduce_server(reducer, TOKEN)
        try:
            good = encode_sparse(select(torch.tensor(DELTA_A[:4]), SparseParams(chunk=4, topk=2, bits=1)))
            bad = _corrupt(good, scales=torch.tensor([float("inf")]).numpy().tobytes())
            header = node_pb2.ShardHeader(round_id=7, shard_index=0, num_shards=2, sender_id="hostile",
                                          total_numel=8)
            requests = [node_pb2.ShardChunk(header=header if i == 0 else None, chunk=chunk)
                        for i, chunk in enumerate(iter_chunks(bad))]   # type: ignore[arg-type]
            async with grpc.aio.insecure_channel(address) as channel:
                stub = node_pb2_grpc.NodeStub(channel)
                call = stub.ReduceShard(iter(requests), metadata=token_metadata(TOKEN), timeout=10)
                own = select(torch.tensor(DELTA_B[:4]), SparseParams(chunk=4, topk=2, bits=1)).dense()
                local = asyncio.ensure_future(reducer.reduce_local(
                    node_pb2.ShardHeader(round_id=7, shard_index=0, num_shards=2, sender_id="owner",
                                         total_numel=8), own, "sparse"))
                replies = [r async for r in call]
                mean = (await local).mean
            assert mean is not None
            return replies[0], mean
        finally:
            await server.stop(0)

    reply, mean = asyncio.run(run())
    assert "finite" in reply.refused                  # the hostile part was dropped, with the reason
    assert reply.contributors == 1
    assert mean.tolist() == [1.5, 0.0, -1.5, 0.0]     # the owner's own part alone


# --------------------------------------------------------------------------- state and config


def test_error_feedback_travels_with_the_replica_state_and_is_validated() -> None:
    c = sparse_cfg()
    src = replica_with_delta(DELTA_A, c)
    job = src.begin_sync(1)
    assert job is not None
    src.finish_sync(job, job.delta)
    parts = state_to_parts(src.state_dict())
    assert "ef/0/w" in parts["outer"]
    dst = replica_with_delta(DELTA_B, c)
    dst.load_state_dict(state_from_parts(parts, dst.fragments))
    assert torch.equal(dst.error.residual(0), src.error.residual(0))
    assert torch.equal(dst.global_params["w"], src.global_params["w"])
    bad = state_from_parts(parts, dst.fragments)
    bad["error"][0]["w"] = torch.full((8,), float("nan"))
    with pytest.raises(ValueError, match="error feedback w: non-finite"):
        dst.load_state_dict(bad)
    empty = state_from_parts({k: {n: t for n, t in v.items() if not n.startswith("ef/")} for k, v in parts.items()},
                             dst.fragments)
    dst.load_state_dict(empty)                         # a source with no debt: ours is dropped too
    assert dst.error.residual(0) is None


def test_sparse_settings_are_validated_and_selectable_in_the_simulator() -> None:
    run = apply_overrides(RunConfig(), ["diloco.codec=sparse", "diloco.sparse_topk=128", "diloco.sparse_bits=1"])
    assert (run.diloco.codec, run.diloco.sparse_topk, run.diloco.sparse_bits) == ("sparse", 128, 1)
    for bad, name in [(dict(sparse_topk=5000), "diloco.sparse_topk"), (dict(sparse_bits=3), "diloco.sparse_bits"),
                      (dict(sparse_error_decay=0.0), "diloco.sparse_error_decay"),
                      (dict(sparse_outer_momentum=1.0), "diloco.sparse_outer_momentum"),
                      (dict(sparse_reply_topk=-1), "diloco.sparse_reply_topk"),
                      (dict(backend="hivemind"), "diloco.codec")]:
        with pytest.raises(ConfigError, match=name):
            dataclasses.replace(sparse_cfg(), **bad)
    sim = load_sim_config(None, ["diloco.codec=sparse", "diloco.sparse_topk=32", "diloco.sparse_reply_topk=64",
                                 "diloco.sparse_outer_momentum=0.5"])
    assert sim.run.diloco.codec == "sparse" and sim.run.diloco.sparse_topk == 32
    assert (sim.run.diloco.sparse_reply_topk, sim.run.diloco.sparse_outer_momentum) == (64, 0.5)
    default = RunConfig().diloco   # the defaults are bandwidth.md's best (with outer_lr 2, alpha 0)
    assert (default.sparse_topk, default.sparse_reply_topk, default.sparse_error_decay) == (320, 800, 0.9)


def test_sparse_merge_keeps_the_progress_made_during_the_overlap() -> None:
    """alpha 0, tau 1: θ_local becomes θ_global_new plus the step taken while the exchange ran; what the
    selection left out stays owed in the error feedback only (not kept in θ_local too)."""
    c = sparse_cfg(inner_steps=2, overlap=1)
    d = replica_with_delta(DELTA_A, c)
    job = d.begin_sync(2)
    assert job is not None
    step = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.25])
    with torch.no_grad():
        d.params["w"].add_(step)                       # the inner step during the exchange
    d.finish_sync(job, job.delta)                      # alone in the round: the mean is its own part
    assert torch.equal(d.global_params["w"], -job.delta)
    assert torch.equal(d.params["w"].detach(), -job.delta + step)


def _owing_replica(module: nn.Module, c: DilocoSection, seed: int) -> StreamingDiLoCo:
    """A sparse replica of ``module`` after one round of its own: its error feedback owes something."""
    d = StreamingDiLoCo(module, c)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    job = d.begin_sync(1, fragment=0)
    assert job is not None
    d.finish_sync(job, job.delta)
    return d


def test_replica_copy_carries_the_error_feedback_and_a_checkfree_rebuild_starts_it_at_zero() -> None:
    """The decision for CheckFree: a rebuilt stage's error feedback starts at zero. Its neighbours' buffers
    are debts of their own stages' parameters against their own θ_global (CheckFree borrows their weights
    by block name, not their pending updates), and the rebuilt weights are a new θ_global no replica's debt
    refers to; averaging the neighbours' debts would apply updates meant for other stages here. So the
    rebuild asks its neighbours for their weights only, and its first round sends its own Δ alone. A replica
    copy (a live replica of the same stage) carries the source's buffers exactly."""
    model = ModelConfig.from_preset("tiny")
    c = sparse_cfg(inner_steps=4, overlap=0, sparse_chunk=64, sparse_topk=4, sparse_bits=2)

    async def main() -> None:
        nodes = {s: await start_node(f"n{s}", s, init_stage(model, s, 4, seed=s), dim=model.dim,
                                     max_seq_len=model.max_seq_len) for s in (1, 3)}
        dilocos = {s: _owing_replica(n.runtime.module, c, seed=s) for s, n in nodes.items()}
        asked: list[list[str]] = []
        for s, n in nodes.items():
            def provider(stage: int, parts: list[str], n=n, d=dilocos[s]):   # type: ignore[no-untyped-def]
                async def serve() -> StateSnapshot:
                    asked.append(sorted(parts))
                    have = {"local": await n.runtime.state(), **state_to_parts(d.state_dict())}
                    return StateSnapshot(parts={k: v for k, v in have.items() if k in parts}, inner_step=40)
                return serve()
            n.servicer.state_provider = provider
        transport = Transport(NODE_TOKEN)
        try:
            copy = coordinator_pb2.RecoveryPlan(stage=1, method="replica-copy", plan_id=1)
            copy.sources.add(node_id="n1", address=nodes[1].address, stage=1)
            module = build_stage(model, 1, 4, seed=99)
            _, _, outer = await obtain_weights(transport, "me", module, "replica-copy", copy, 1.0)
            assert any(name.startswith("ef/0/") for name in outer["outer"])
            copied = StreamingDiLoCo(module, c)
            copied.load_state_dict(state_from_parts(outer, copied.fragments), reset_local=False)
            assert torch.equal(copied.error.residual(0), dilocos[1].error.residual(0))
            assert float(dilocos[1].error.residual(0).abs().sum()) > 0

            asked.clear()
            plan = coordinator_pb2.RecoveryPlan(stage=2, method="checkfree", lr_scale=1.1, plan_id=2)
            plan.sources.add(node_id="n1", address=nodes[1].address, stage=1)
            plan.sources.add(node_id="n3", address=nodes[3].address, stage=3)
            plan.weights.extend([1.0, 1.0])
            rebuilt = build_stage(model, 2, 4, seed=99)
            _, _, outer = await obtain_weights(transport, "me", rebuilt, "checkfree", plan, 1.0)
            assert outer == {} and asked == [["local"], ["local"]]   # weights only: no neighbour's debt
            d = StreamingDiLoCo(rebuilt, c)
            assert d.error.keys() == []
            for name, p in rebuilt.named_parameters():   # θ_global = the rebuilt weights
                assert torch.equal(d.global_params[name], p.detach().float())
            with torch.no_grad():
                for p in rebuilt.parameters():
                    p.mul_(0.99)
            job = d.begin_sync(1, fragment=0)
            assert job is not None and job.sparse is not None
            own = select(torch.cat([t.reshape(-1) for t in d.pseudo_gradient(0).values()]), d.sparse)
            assert torch.equal(job.sparse.indices, own.indices) and torch.equal(job.delta, own.dense())
        finally:
            await transport.close()
            for n in nodes.values():
                await n.stop()

    asyncio.run(main())
