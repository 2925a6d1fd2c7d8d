"""The subspace hop (protocols/subspace.py): a subspace model's activations cross as their learned
coordinates and the token ids, exactly; bad payloads are refused; replicas and rebuilt stages agree."""

from __future__ import annotations

import argparse
import asyncio
import copy

import grpc
import pytest
import torch
from node_cluster import RUN_ID, TOKEN, install_schedule, start_node, stopping

from lowband.node.pipeline.agent import PathSpec
from lowband.node.pipeline.local_hop import CodecHop
from lowband.node.pipeline.payload import build_microbatch, lift_received
from lowband.node.pipeline.transport import Transport
from lowband.node.recovery.checkfree import bookend_copy_state, load_rebuilt
from lowband.node.recovery.obtain import obtain_weights
from lowband.node.service import StateSnapshot
from lowband.node.train.along_path import path_loss, run_path
from lowband.node.train.model import (
    ModelConfig,
    Transformer,
    build_stage,
    init_stage,
    split_model,
    subspace_basis,
)
from lowband.protocols import coordinator_pb2, node_pb2, node_pb2_grpc, tensor_pb2
from lowband.protocols.chunking import chunk_tensor
from lowband.protocols.codec import decode, payload_checksum
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.protocols.errors import ValidationError
from lowband.protocols.rpc import grpc_options, token_metadata
from lowband.protocols.subspace import ANCHOR_SCALE, SUBSPACE_CODECS, make_basis

torch.set_num_threads(1)

RANK = 16
CFG = ModelConfig.from_preset("tiny", subspace_rank=RANK)
BASIS = subspace_basis(CFG)
S, B, T = 4, 2, 16
HEADER = node_pb2.MicrobatchHeader(run_id="r", origin_id="o")


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _activation(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A real activation between stages 1 and 2 of a subspace model, and its tokens."""
    stages = split_model(Transformer(CFG, seed=seed), S)
    tokens, _ = _batch(seed)
    with torch.no_grad():
        return stages[1](stages[0].embed_tokens(tokens)), tokens


def _cross(x: torch.Tensor, codec: str, *, backward: bool = False) -> torch.Tensor:
    out = build_microbatch(HEADER, x, codec, subspace=BASIS, backward=backward)
    decoded = decode(out.meta, payload=bytearray(bytes(out.payload)), require_finite=True, require_checksum=False)
    return lift_received(out.meta, decoded, BASIS)


# ---------------------------------------------------------------------------------------- the model


def test_blocks_never_write_the_anchor_part() -> None:
    x, tokens = _activation()
    assert torch.equal(x[..., RANK:], BASIS.anchors[tokens])
    assert torch.equal(BASIS.tokens_of(x), tokens)
    assert CFG.num_params() == sum(p.numel() for p in Transformer(CFG, seed=0).parameters())


def test_anchors_are_a_function_of_the_shape_alone() -> None:
    """Built twice (two processes, two machines), the anchors are the same bits; another shape, another fingerprint."""
    make_basis.cache_clear()
    again = make_basis(CFG.dim, RANK, CFG.vocab_size)
    assert again is not BASIS and torch.equal(again.anchors, BASIS.anchors)
    assert again.fingerprint == BASIS.fingerprint
    assert make_basis(CFG.dim, RANK + 1, CFG.vocab_size).fingerprint != BASIS.fingerprint
    assert torch.equal(BASIS.anchors.abs().unique(), torch.tensor([ANCHOR_SCALE]))


def test_a_state_with_other_anchors_is_refused() -> None:
    stage0 = init_stage(CFG, 0, S, seed=1)
    state = stage0.state_dict()
    state["embed.anchors"] = -state["embed.anchors"]
    with pytest.raises(ValueError, match="anchors differ"):
        init_stage(CFG, 0, S, seed=2).load_state_dict(state)


def test_bookend_copy_carries_the_anchors_and_rebuilds_stage_0() -> None:
    source = init_stage(CFG, 0, S, seed=3)
    copy = bookend_copy_state(source.state_dict())
    assert "embed.anchors" in copy
    rebuilt = build_stage(CFG, 0, S, seed=99)
    load_rebuilt(rebuilt, copy)
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, rebuilt.state_dict()[name])


def test_config_needs_a_rank_for_a_subspace_codec() -> None:
    with pytest.raises(ConfigError, match="model\\.subspace_rank"):
        apply_overrides(RunConfig(), ["train.activation_codec=subspace-int8"])
    with pytest.raises(ValueError, match="anchor entries"):
        ModelConfig.from_preset("tiny", subspace_rank=125)
    config = apply_overrides(RunConfig(), ["model.subspace_rank=16", "train.activation_codec=subspace-int8"])
    assert config.train.activation_codec == "subspace-int8"


# ---------------------------------------------------------------------------------------- the codec


def test_fp32_subspace_hop_is_exact_both_ways() -> None:
    """Forward: the activation comes back bit for bit. Backward: the gradient's learned part does, and
    the sender's parameters get exactly the gradients they would without the hop."""
    x, _ = _activation()
    assert torch.equal(_cross(x, "subspace-fp32"), x)
    grad = torch.randn_like(x)
    crossed = _cross(grad, "subspace-fp32", backward=True)
    assert torch.equal(crossed[..., :RANK], grad[..., :RANK]) and not crossed[..., RANK:].any()

    tokens, targets = _batch(5)
    grads = []
    for hop in (None, CodecHop("subspace-fp32", "subspace-fp32", subspace=BASIS)):
        stages = split_model(Transformer(CFG, seed=4), S)
        path_loss(stages, [0, 1, 2, 3, 0], tokens, targets, hop).backward()
        grads.append([p.grad.clone() for s in stages for p in s.parameters()])
    for plain, hopped in zip(*grads, strict=True):
        torch.testing.assert_close(hopped, plain, rtol=1e-5, atol=1e-7)


def _adversarial(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations whose learned part is random, all zeros, one huge value, or denormal."""
    cases = {"random": x}
    zeros = x.clone()
    zeros[..., :RANK] = 0
    cases["zeros"] = zeros
    huge = x.clone()
    huge[0, 0, 0] = 3e30
    cases["huge"] = huge
    tiny = x.clone()
    tiny[..., :RANK] = 1e-41 * torch.sign(torch.randn_like(x[..., :RANK]))
    cases["denormal"] = tiny
    return cases


# the bound each inner codec states for the coordinates (relative to the block's largest magnitude for the
# quantised ones, per value for the floats)
BOUNDS = {"fp32": 0.0, "bf16": 2 ** -8, "fp16": 2 ** -10, "int8": 0.5 / 127, "fp8": 0.0625, "int4": 0.5 / 7,
          "fp4": 0.5}


@pytest.mark.parametrize("codec", SUBSPACE_CODECS)
def test_each_subspace_codec_round_trips_within_its_bound(codec: str) -> None:
    inner = codec.split("-", 1)[1]
    x, tokens = _activation()
    for name, case in _adversarial(x).items():
        if inner == "fp16" and name == "huge":
            continue   # past fp16's range: refused as non-finite, tested below
        back = _cross(case, codec)
        assert torch.equal(back[..., RANK:], BASIS.anchors[tokens]), name   # the anchors come back exactly
        err = (back[..., :RANK] - case[..., :RANK]).abs()
        if inner in ("int8", "fp8", "int4", "fp4"):
            # block-scaled: the error is bounded by the largest magnitude in the value's block (256 values)
            blocks = case[..., :RANK].reshape(-1)
            pad = (-blocks.numel()) % 256
            scale = torch.cat([blocks, blocks.new_zeros(pad)]).view(-1, 256).abs().amax(1)
            bound = (scale.repeat_interleave(256)[:blocks.numel()] * BOUNDS[inner]).view_as(err)
            # a block wholly below float32's normal range flushes to zero (its inverse scale overflows)
            assert bool((err <= bound * 1.0001 + 1.2e-38).all()), name
        else:
            assert bool((err <= case[..., :RANK].abs() * BOUNDS[inner] + 1e-38).all()), name


def test_fp16_coordinates_past_its_range_are_refused_not_sent_as_inf() -> None:
    x, _ = _activation()
    x[0, 0, 0] = 1e6
    with pytest.raises(ValidationError, match="non-finite"):
        _cross(x, "subspace-fp16")


def test_bytes_per_hop_are_the_coordinates_and_one_byte_of_token() -> None:
    x, _ = _activation()
    forward = build_microbatch(HEADER, x, "subspace-int8", subspace=BASIS)
    backward = build_microbatch(HEADER, x, "subspace-int8", subspace=BASIS, backward=True)
    positions = B * T
    assert len(forward.payload) == positions * RANK
    assert len(forward.meta.subspace.tokens) == positions
    assert len(backward.meta.subspace.tokens) == 0
    plain = build_microbatch(HEADER, x, "bf16")
    assert plain.nbytes / forward.nbytes > 7


def test_an_activation_of_another_model_is_refused_by_the_sender() -> None:
    plain = split_model(Transformer(ModelConfig.from_preset("tiny"), seed=0), S)
    tokens, _ = _batch(0)
    with torch.no_grad():
        x = plain[1](plain[0].embed_tokens(tokens))
    with pytest.raises(ValidationError, match="not an activation of this subspace model"):
        build_microbatch(HEADER, x, "subspace-int8", subspace=BASIS)
    with pytest.raises(ValidationError, match="needs a subspace model"):
        build_microbatch(HEADER, x, "subspace-int8")


def _malformed() -> dict[str, tuple[tensor_pb2.Tensor, bytes]]:
    x, _ = _activation()
    out = build_microbatch(HEADER, x, "subspace-int8", subspace=BASIS)
    good = (out.meta, bytes(out.payload))
    cases: dict[str, tuple[tensor_pb2.Tensor, bytes]] = {}

    def variant(name: str, change) -> None:   # type: ignore[no-untyped-def]
        meta = tensor_pb2.Tensor()
        meta.CopyFrom(good[0])
        change(meta)
        cases[name] = (meta, good[1])

    variant("fingerprint", lambda m: setattr(m.subspace, "fingerprint", m.subspace.fingerprint ^ 1))
    variant("dim", lambda m: setattr(m.subspace, "dim", CFG.dim + 1))
    variant("too few tokens", lambda m: setattr(m.subspace, "tokens", m.subspace.tokens[:-1]))
    variant("token width", lambda m: setattr(m.subspace, "token_bytes", 2))
    variant("width without tokens", lambda m: setattr(m.subspace, "tokens", b""))
    # (token ids past the vocabulary: test_token_ids_past_a_small_vocabulary_are_refused; 256 fits every byte)
    wrong_rank = build_microbatch(HEADER, x.new_zeros(B, T, CFG.dim), "int8")
    meta = tensor_pb2.Tensor()
    meta.CopyFrom(wrong_rank.meta)
    meta.subspace.CopyFrom(good[0].subspace)
    cases["full width sent as coordinates"] = (meta, bytes(wrong_rank.payload))
    return cases


@pytest.mark.parametrize("case", ["fingerprint", "dim", "too few tokens", "token width", "width without tokens",
                                  "full width sent as coordinates"])
def test_malformed_subspace_payloads_are_refused(case: str) -> None:
    meta, payload = _malformed()[case]
    decoded = decode(meta, payload=bytearray(payload), require_finite=True, require_checksum=False)
    with pytest.raises(ValidationError):
        lift_received(meta, decoded, BASIS)


def test_token_ids_past_a_small_vocabulary_are_refused() -> None:
    basis = make_basis(64, 8, 100)
    x = basis.lift(torch.randn(1, 4, 8), torch.tensor([[0, 1, 2, 99]]))
    out = build_microbatch(HEADER, x, "subspace-bf16", subspace=basis)
    meta = tensor_pb2.Tensor()
    meta.CopyFrom(out.meta)
    meta.subspace.tokens = bytes([0, 1, 2, 100])
    decoded = decode(meta, payload=bytearray(bytes(out.payload)), require_checksum=False)
    with pytest.raises(ValidationError, match="outside"):
        lift_received(meta, decoded, basis)
    with pytest.raises(ValidationError, match="no subspace"):
        lift_received(out.meta, decoded, None)


# ---------------------------------------------------------------------------------------- nodes


FULL = [PathSpec(0, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin"))]


def _train_in_one_process(stages: dict[int, torch.nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]],
                          lr: float, hop: CodecHop) -> list[float]:
    """SGD on the full path in one process, one batch an iteration, every hop through ``hop``: the losses."""
    opt = torch.optim.SGD([p for s in range(S) for p in stages[s].parameters()], lr=lr)
    losses = []
    for x, y in batches:
        loss = path_loss(stages, [0, 1, 2, 3, 0], x, y, hop)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_malformed_subspace_payload_gets_invalid_argument_and_changes_nothing() -> None:
    async def main() -> None:
        stages = {s: init_stage(CFG, s, S, seed=0) for s in range(S)}
        async with stopping([]) as nodes:
            for s, node_id in enumerate(["origin", "n1", "n2", "n3"]):
                nodes.append(await start_node(node_id, s, stages[s], dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                              codec="subspace-int8", subspace=BASIS))
            install_schedule(nodes, {"origin": FULL})
            before = {k: v.clone() for k, v in nodes[1].runtime.module.state_dict().items()}
            header = node_pb2.MicrobatchHeader(run_id=RUN_ID, iteration=0, microbatch=0, origin_id="origin",
                                               stages=[0, 1, 2, 3, 0],
                                               node_ids=["origin", "n1", "n2", "n3", "origin"], hop=1)
            channel = grpc.aio.insecure_channel(nodes[1].address, options=grpc_options())
            stub = node_pb2_grpc.NodeStub(channel)
            try:
                for name, (meta, payload) in _malformed().items():
                    whole = tensor_pb2.Tensor()
                    whole.CopyFrom(meta)
                    whole.payload = payload
                    whole.checksum = payload_checksum(whole.scales, whole.payload)
                    chunks = chunk_tensor(whole)
                    requests = [node_pb2.MicrobatchChunk(header=header, chunk=chunks[0])]
                    requests += [node_pb2.MicrobatchChunk(chunk=c) for c in chunks[1:]]
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Forward(iter(requests), metadata=token_metadata(TOKEN), timeout=5)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            finally:
                await channel.close()
            after = nodes[1].runtime.module.state_dict()
            assert all(torch.equal(v, after[k]) for k, v in before.items())
            assert nodes[1].runtime.iteration == 0

    asyncio.run(main())


def _serve_state(node) -> None:   # type: ignore[no-untyped-def]
    async def provider(stage: int, parts: list[str]) -> StateSnapshot:
        return StateSnapshot(parts={"local": await node.runtime.state()}, inner_step=7)

    node.servicer.state_provider = provider


def test_a_replica_and_a_checkfree_rebuilt_stage_decode_their_neighbours_after_a_membership_change() -> None:
    """Train an iteration over subspace-int8 hops; then stage 2 is lost (rebuilt by CheckFree from stages 1
    and 3 on a new node) and stage 3 moves to a replica (copied): the next iterations over the new
    nodes lose no microbatch, and their losses are those of one process with the same modules and hops."""
    lr = 0.3

    async def main() -> tuple[list[float], dict[int, torch.nn.Module]]:
        stages = {s: init_stage(CFG, s, S, seed=0) for s in range(S)}
        async with stopping([]) as nodes:
            for s, node_id in enumerate(["origin", "n1", "n2", "n3"]):
                opt = torch.optim.SGD(stages[s].parameters(), lr=lr)
                nodes.append(await start_node(node_id, s, stages[s], dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                              optimizer=opt, codec="subspace-int8", subspace=BASIS))
            install_schedule(nodes, {"origin": FULL})
            first = await asyncio.wait_for(nodes[0].agent.run_iteration(0, [_batch(10)]), 30)
            assert first.abandoned == 0
            for n in nodes:
                _serve_state(n)
            transport = Transport(TOKEN)
            try:
                rebuilt = build_stage(CFG, 2, S, seed=99)
                plan = coordinator_pb2.RecoveryPlan(stage=2, method="checkfree", lr_scale=1.0, plan_id=1)
                plan.sources.add(node_id="n1", address=nodes[1].address, stage=1)
                plan.sources.add(node_id="n3", address=nodes[3].address, stage=3)
                plan.weights.extend([1.0, 1.0])
                await obtain_weights(transport, "m2", rebuilt, "checkfree", plan, 1.0)
                replica = build_stage(CFG, 3, S, seed=98)
                plan = coordinator_pb2.RecoveryPlan(stage=3, method="replica-copy", plan_id=2)
                plan.sources.add(node_id="n3", address=nodes[3].address, stage=3)
                await obtain_weights(transport, "r3", replica, "replica-copy", plan, 1.0)
            finally:
                await transport.close()
            for n in nodes[2:]:
                await n.stop()
            del nodes[2:]
            for node_id, s, module in (("m2", 2, rebuilt), ("r3", 3, replica)):
                opt = torch.optim.SGD(module.parameters(), lr=lr)
                nodes.append(await start_node(node_id, s, module, dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                              optimizer=opt, codec="subspace-int8", subspace=BASIS))
            for n in nodes[2:]:
                n.runtime.iteration = 1
            snapshot = {0: nodes[0].runtime.module, 1: nodes[1].runtime.module, 2: rebuilt, 3: replica}
            reference = {s: copy.deepcopy(m) for s, m in snapshot.items()}
            path = [PathSpec(0, (0, 1, 2, 3, 0), ("origin", "n1", "m2", "r3", "origin"))]
            install_schedule(nodes, {"origin": path}, epoch=2)
            losses = []
            for it in (1, 2):
                result = await asyncio.wait_for(nodes[0].agent.run_iteration(it, [_batch(10 + it)]), 30)
                assert result.abandoned == 0
                losses.append(result.loss)
            return losses, reference

    losses, reference = asyncio.run(main())
    expected = _train_in_one_process(reference, [_batch(11), _batch(12)], lr,
                                     CodecHop("subspace-int8", "subspace-int8", subspace=BASIS))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # and the rebuilt pipeline is a working model: its logits are those of one process
    tokens, _ = _batch(3)
    assert torch.isfinite(run_path(reference, [0, 1, 2, 3, 0], tokens)).all()


def test_the_planner_charges_a_link_what_the_hop_sends() -> None:
    from lowband.coordinator.planning import activation_bytes

    x, _ = _activation()
    forward = build_microbatch(HEADER, x, "subspace-int8", subspace=BASIS)
    backward = build_microbatch(HEADER, x, "subspace-bf16", subspace=BASIS, backward=True)
    sent = [len(m.payload) + len(m.meta.scales) + len(m.meta.subspace.tokens) for m in (forward, backward)]
    config = apply_overrides(RunConfig(), [f"model.subspace_rank={RANK}", f"model.seq_len={T}",
                                           f"train.microbatch_size={B}", "train.activation_codec=subspace-int8",
                                           "train.gradient_codec=subspace-bf16"])
    assert activation_bytes(config) == pytest.approx(sum(sent) / 2, rel=1e-9)
    plain = apply_overrides(RunConfig(), [f"model.seq_len={T}", f"train.microbatch_size={B}"])
    assert activation_bytes(plain) == B * T * CFG.dim * 2


def test_the_activations_benchmark_reports_a_subspace_codec_against_bf16() -> None:
    from bench_loader import load_benchmark

    bench = load_benchmark("activations")
    assert bench.parse_pair("subspace-int8/subspace-bf16@16") == ("subspace-int8", "subspace-bf16", 16)
    with pytest.raises(argparse.ArgumentTypeError, match="rank"):
        bench.parse_pair("subspace-int8")
    ns = argparse.Namespace(baseline="bf16", codecs=["subspace-int8@16"], seeds=[0], steps=2, stages=4, warmup=1,
                            lr=4e-3, microbatches=1, microbatch_size=2, seq_len=16, eval_batches=1, max_gap=0.01)
    result = bench.run(ns)
    row, base = result["codecs"]["subspace-int8@16"], result["codecs"]["bf16"]
    # per position and hop: 16 int8 coordinates (+ scales) and a token byte forward, against 128 bf16 values
    assert 8 < row["reduction_vs_bf16"] < 16
    assert row["forward_bytes_per_token"] > row["backward_bytes_per_token"]   # the token ids go forward only
    assert base["gap"] == 0.0 and row["val_loss"] > 0


@pytest.mark.parametrize("wire", [True, False], ids=["wire", "grpc-fallback"])
def test_subspace_hops_train_as_one_process_on_the_wire_and_on_the_grpc_fallback(wire: bool) -> None:
    """Three iterations over subspace-int8 activations and subspace-bf16 gradients: the origin's losses are
    those of one process whose hops go through the same encoder and decoder, on either transport."""
    lr = 0.3

    async def main() -> list[float]:
        stages = {s: init_stage(CFG, s, S, seed=1) for s in range(S)}
        async with stopping([]) as nodes:
            for s, node_id in enumerate(["origin", "n1", "n2", "n3"]):
                opt = torch.optim.SGD(stages[s].parameters(), lr=lr)
                nodes.append(await start_node(node_id, s, stages[s], dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                              optimizer=opt, codec="subspace-int8", gradient_codec="subspace-bf16",
                                              subspace=BASIS, wire=wire))
            install_schedule(nodes, {"origin": FULL})
            losses = []
            for it in range(3):
                result = await asyncio.wait_for(nodes[0].agent.run_iteration(it, [_batch(20)]), 30)
                assert result.abandoned == 0
                losses.append(result.loss)
            return losses

    losses = asyncio.run(main())
    reference = {s: init_stage(CFG, s, S, seed=1) for s in range(S)}
    expected = _train_in_one_process(reference, [_batch(20)] * 3, lr,
                                     CodecHop("subspace-int8", "subspace-bf16", subspace=BASIS))
    assert expected[2] < expected[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_a_node_whose_model_is_not_a_subspace_model_abandons_instead_of_sending() -> None:
    """A configuration mismatch (a subspace codec on a plain model) costs the microbatch, with a reason,
    never a crash or a payload the next node would misread."""
    plain = ModelConfig.from_preset("tiny")

    async def main() -> tuple[int, int]:
        async with stopping([]) as nodes:
            for s, node_id in enumerate(["origin", "n1", "n2", "n3"]):
                nodes.append(await start_node(node_id, s, init_stage(plain, s, S, seed=0), dim=plain.dim,
                                              max_seq_len=plain.max_seq_len, codec="subspace-int8", subspace=BASIS))
            install_schedule(nodes, {"origin": FULL})
            result = await asyncio.wait_for(nodes[0].agent.run_iteration(0, [_batch(1)]), 30)
            return result.abandoned, sum(n.transport.activation_bytes_sent for n in nodes)

    abandoned, sent = asyncio.run(main())
    assert abandoned == 1 and sent == 0
