"""The pipeline over gRPC inside one process: numerics against a single-process reference, failures, bad input."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
import torch
from node_cluster import RUN_ID, TOKEN, LocalNode, install_schedule, start_node, stopping

from lowband.node.pipeline.agent import PathSpec, Schedule
from lowband.node.pipeline.local_hop import CodecHop
from lowband.node.train.along_path import path_loss
from lowband.node.train.model import ModelConfig, init_stage
from lowband.protocols import node_pb2, node_pb2_grpc
from lowband.protocols.chunking import chunk_tensor
from lowband.protocols.codec import encode
from lowband.protocols.rpc import grpc_options, token_metadata

torch.set_num_threads(1)

CFG = ModelConfig.from_preset("tiny")
S = 4
B, T = 2, 16


def _stages(seed: int = 0) -> dict[int, torch.nn.Module]:
    return {s: init_stage(CFG, s, S, seed=seed) for s in range(S)}


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


@asynccontextmanager
async def _cluster(stages: dict[int, torch.nn.Module], lr: float, **kw: object) -> AsyncIterator[list[LocalNode]]:
    """One node per stage; all stopped on the way out, also when a later one fails to start."""
    async with stopping([]) as nodes:
        for s, node_id in enumerate(["origin", "n1", "n2", "n3"]):
            module = stages[s]
            opt = torch.optim.SGD(module.parameters(), lr=lr)
            nodes.append(await start_node(node_id, s, module, dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                          optimizer=opt, **kw))
        yield nodes


def test_skip_paths_match_reference_mean_over_visits() -> None:
    """Two microbatches, one skipping stage 2: each stage's step uses the mean over the microbatches that
    visited it (stage 2 sees one), exactly as computed by autograd on the whole model in one process."""
    paths = [PathSpec(0, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin")),
             PathSpec(1, (0, 1, 3, 0), ("origin", "n1", "n3", "origin"))]
    batches = [_batch(1), _batch(2)]
    lr = 0.5

    # Reference: per-stage gradient = mean over the visiting microbatches' gradients.
    ref = {s: copy.deepcopy(m) for s, m in _stages().items()}
    losses_ref = [path_loss(ref, list(p.stages), x, y) for p, (x, y) in zip(paths, batches, strict=True)]
    grads = [torch.autograd.grad(loss, [p for s in range(S) for p in ref[s].parameters()], allow_unused=True)
             for loss in losses_ref]
    flat = [p for s in range(S) for p in ref[s].parameters()]
    stage_of = [s for s in range(S) for _ in ref[s].parameters()]
    with torch.no_grad():
        for i, p in enumerate(flat):
            visiting = [g[i] for g in grads if g[i] is not None]
            if stage_of[i] == 2:
                assert len(visiting) == 1
            p -= lr * torch.stack(visiting).mean(0)

    async def main() -> tuple[list[float | None], list[LocalNode]]:
        async with _cluster(_stages(), lr) as nodes:
            install_schedule(nodes, {"origin": paths})
            assert [n.runtime.expected for n in nodes] == [2, 2, 1, 2]
            result = await asyncio.wait_for(nodes[0].agent.run_iteration(0, batches), 30)
            # every stage stepped exactly once
            for n in nodes:
                for _ in range(50):
                    if n.runtime.iteration == 1:
                        break
                    await asyncio.sleep(0.02)
            return result.losses, nodes

    losses, nodes = asyncio.run(main())
    assert len(losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([float(x.detach()) for x in losses_ref]))
    for n in nodes:
        assert n.runtime.iteration == 1 and n.runtime.steps_applied == 1
        # fp32 activations, same ops: agreement to float rounding
        for (name, p), q in zip(n.runtime.module.named_parameters(), ref[n.stage].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"stage {n.stage} {name}")


FULL = [PathSpec(0, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin"))]


def _train_in_one_process(lr: float, hop: CodecHop | None = None) -> list[float]:
    """Three SGD iterations of the full path in one process (the same model and batch as the cluster's)."""
    ref = _stages()
    opt = torch.optim.SGD([p for s in range(S) for p in ref[s].parameters()], lr=lr)
    losses = []
    for _ in range(3):
        x, y = _batch(10)
        loss = path_loss(ref, [0, 1, 2, 3, 0], x, y, hop)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train_on_cluster(lr: float, **kw: object) -> tuple[list[float], int]:
    """The same three iterations on one node per stage: the origin's losses and the activation bytes sent."""
    async def main() -> tuple[list[float], int]:
        async with _cluster(_stages(), lr, **kw) as nodes:
            install_schedule(nodes, {"origin": FULL})
            out = []
            for it in range(3):
                result = await asyncio.wait_for(nodes[0].agent.run_iteration(it, [_batch(10)]), 30)
                assert result.abandoned == 0
                out.append(result.loss)
            return out, sum(n.transport.activation_bytes_sent for n in nodes)

    return asyncio.run(main())


def test_training_iterations_match_single_process() -> None:
    """Three iterations of the full pipeline (fp32 codec) give the losses of the same model trained in one process."""
    ref_losses = _train_in_one_process(0.3)
    losses, _ = _train_on_cluster(0.3)
    assert ref_losses[2] < ref_losses[0]   # it trains
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codecs", [("int8", "bf16"), ("fp4", "int8")])
def test_compressed_hops_train_as_the_in_process_codec_hop_does(codecs: tuple[str, str]) -> None:
    """Activations in one codec, their gradients in another: the pipeline's losses are those of one process
    whose hops go through the same encoder and decoder (``local_hop.CodecHop``), so what
    benchmarks/activations.py measures is what a run does."""
    activation_codec, gradient_codec = codecs
    hop = CodecHop(activation_codec, gradient_codec)
    ref_losses = _train_in_one_process(0.3, hop)
    losses, sent = _train_on_cluster(0.3, codec=activation_codec, gradient_codec=gradient_codec)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    # the stages send what the in-process hop counted (its headers are smaller than a path's)
    assert 0.9 * sum(hop.bytes.values()) <= sent <= sum(hop.bytes.values())


def test_dead_hop_abandons_without_hanging() -> None:
    """A stage node that is gone: the origin's microbatches are abandoned, the suspect is reported,
    every node that kept something for them closes its iteration, and nothing waits past its timeout."""
    paths = [PathSpec(m, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin")) for m in range(2)]

    async def main() -> None:
        async with _cluster(_stages(), 0.1, hop_timeout_s=2.0, iteration_timeout_s=3.0) as nodes:
            install_schedule(nodes, {"origin": paths})
            await nodes[2].server.stop(None)   # n2 disappears
            start = time.monotonic()
            result = await asyncio.wait_for(nodes[0].agent.run_iteration(0, [_batch(1), _batch(2)]), 20)
            assert result.abandoned == 2 and result.losses == []
            assert time.monotonic() - start < 10
            suspects = {s for s, _ in nodes[1].failures}
            assert suspects == {"n2"}
            # n1 kept activations for both and was told to drop them: its iteration is closed
            # n3 never saw them; the origin's abandon notices close its iteration as well
            for _ in range(100):
                if nodes[1].runtime.iteration == 1 and nodes[3].runtime.iteration == 1:
                    break
                await asyncio.sleep(0.05)
            assert nodes[0].runtime.iteration == 1
            assert nodes[1].runtime.iteration == 1
            assert nodes[3].runtime.iteration == 1
            assert time.monotonic() - start < 3.0   # closed by notices, not by the 3 s iteration timeout

    asyncio.run(main())


@pytest.mark.parametrize("change", ["left", "moved"])
def test_membership_change_abandons_microbatches_through_a_departed_node(change: str) -> None:
    """A node that takes a microbatch and then leaves the run, or is moved to another stage (CheckFree
    rebuilds a dead stage with it, dropping what it kept for its old one): it never answers. Once the
    origin's schedule shows the change, the origin gives up at once instead of waiting for the timeout."""
    paths = [PathSpec(m, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin")) for m in range(2)]

    async def main() -> None:
        async with _cluster(_stages(), 0.1, hop_timeout_s=5.0, iteration_timeout_s=30.0) as nodes:
            install_schedule(nodes, {"origin": paths})

            async def swallow(*args: object, **kwargs: object) -> None:
                await asyncio.sleep(3600)   # n3 accepts and never answers, like a node being preempted

            nodes[3].agent._process = swallow  # type: ignore[method-assign]
            origin = nodes[0].agent
            start = time.monotonic()
            run = asyncio.create_task(origin.run_iteration(0, [_batch(1), _batch(2)]))
            await asyncio.sleep(1.0)
            assert not run.done()
            left = dict(origin.schedule.stages)
            if change == "left":
                del left["n3"]
            else:
                left["n3"] = 2
            origin.set_schedule(Schedule(epoch=2, paths=[], addresses=dict(origin.schedule.addresses),
                                         stages=left, visits={}))
            result = await asyncio.wait_for(run, 10)
            assert result.abandoned == 2 and result.losses == []
            assert time.monotonic() - start < 4.0   # the microbatch timeout here is 40 s

    asyncio.run(main())


def test_a_plan_change_mid_iteration_counts_its_microbatches_by_the_plan_they_were_launched_under() -> None:
    """Membership changes re-plan while microbatches are in flight. The stage nodes take the new plan
    (3 microbatches through each) before the origin's iteration 0, launched under the old plan (2),
    reaches them: they close iteration 0 after its 2 microbatches instead of waiting for a third until
    the iteration timeout, and iteration 1 (the new plan) follows at once."""
    old = [PathSpec(m, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin")) for m in range(2)]
    new = [PathSpec(m, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin")) for m in range(3)]

    async def main() -> None:
        async with _cluster(_stages(), 0.1, hop_timeout_s=5.0, iteration_timeout_s=30.0) as nodes:
            install_schedule(nodes, {"origin": old}, epoch=1)
            origin = nodes[0].agent
            start = time.monotonic()
            first = asyncio.create_task(origin.run_iteration(0, [_batch(1), _batch(2)]))
            await asyncio.sleep(0)   # the origin has launched iteration 0 under the plan of epoch 1
            install_schedule(nodes, {"origin": new}, epoch=2, only=nodes[1:])
            assert all(n.runtime.pending() == 3 for n in nodes[1:])   # nothing of iteration 0 seen yet
            result = await asyncio.wait_for(first, 10)
            assert result.abandoned == 0 and len(result.losses) == 2
            install_schedule(nodes, {"origin": new}, epoch=2)
            result = await asyncio.wait_for(origin.run_iteration(1, [_batch(3), _batch(4), _batch(5)]), 10)
            assert result.abandoned == 0 and len(result.losses) == 3
            for _ in range(50):
                if all(n.runtime.iteration == 2 for n in nodes):
                    break
                await asyncio.sleep(0.1)
            assert [n.runtime.iteration for n in nodes] == [2, 2, 2, 2]
            assert [n.runtime.steps_applied for n in nodes] == [2, 2, 2, 2]
            assert time.monotonic() - start < 10.0   # the iteration timeout here is 30 s

    asyncio.run(main())


def test_bad_input_refused_and_changes_nothing() -> None:
    paths = [PathSpec(0, (0, 1, 2, 3, 0), ("origin", "n1", "n2", "n3", "origin"))]

    async def main() -> None:
        async with _cluster(_stages(), 0.1) as nodes:
            install_schedule(nodes, {"origin": paths})
            target = nodes[1]
            before = {k: v.clone() for k, v in target.runtime.module.state_dict().items()}
            channel = grpc.aio.insecure_channel(target.address, options=grpc_options())
            stub = node_pb2_grpc.NodeStub(channel)
            header = node_pb2.MicrobatchHeader(run_id=RUN_ID, iteration=0, microbatch=0, origin_id="origin",
                                               stages=[0, 1, 2, 3, 0],
                                               node_ids=["origin", "n1", "n2", "n3", "origin"], hop=1)

            def stream(h: node_pb2.MicrobatchHeader, t: torch.Tensor) -> list[node_pb2.MicrobatchChunk]:
                chunks = chunk_tensor(encode(t, "fp32"))
                return [node_pb2.MicrobatchChunk(header=h, chunk=chunks[0])] + [
                    node_pb2.MicrobatchChunk(chunk=c) for c in chunks[1:]]

            good = torch.randn(B, T, CFG.dim)
            # wrong token
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Forward(iter(stream(header, good)), metadata=token_metadata("nope"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            bad_cases = []
            wrong_node = node_pb2.MicrobatchHeader()
            wrong_node.CopyFrom(header)
            wrong_node.hop = 2
            bad_cases.append(stream(wrong_node, good))                          # hop is someone else
            bad_cases.append(stream(header, torch.randn(B, T, CFG.dim + 1)))    # wrong width
            bad_cases.append(stream(header, torch.full((B, T, CFG.dim), float("nan"))))  # non-finite
            wrong_run = node_pb2.MicrobatchHeader()
            wrong_run.CopyFrom(header)
            wrong_run.run_id = "other"
            bad_cases.append(stream(wrong_run, good))
            headerless = stream(header, good)
            headerless[0].ClearField("header")
            bad_cases.append(headerless)
            corrupt = stream(header, good)
            # a bit flipped inside the payload (the last byte, tried before, ends the checksum's varint:
            # 'x' there left the parsed message unchanged in ~6% of runs, rightly accepted)
            flipped = bytearray(corrupt[0].chunk.data)
            flipped[len(flipped) // 2] ^= 0x01
            corrupt[0].chunk.data = bytes(flipped)
            bad_cases.append(corrupt)
            for case in bad_cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Forward(iter(case), metadata=token_metadata(TOKEN), timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            # unknown microbatch backward: refused, still alive
            back = node_pb2.MicrobatchHeader()
            back.CopyFrom(header)
            back.hop = 1
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Backward(iter(stream(back, good)), metadata=token_metadata(TOKEN), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            reply = await stub.Ping(node_pb2.PingRequest(sent_at=1.0), metadata=token_metadata(TOKEN), timeout=5)
            assert reply.node_id == "n1" and reply.stage == 1
            await channel.close()
            after = target.runtime.module.state_dict()
            for k, v in before.items():
                assert torch.equal(v, after[k])
            assert target.runtime.iteration == 0 and target.runtime.steps_applied == 0

    asyncio.run(main())


@pytest.mark.parametrize("change", ["died", "moved"])
def test_a_gone_origins_unfinished_microbatches_do_not_hold_the_stages_iteration_open(change: str) -> None:
    """Two origins share the stage nodes; one dies (or is moved to rebuild a block stage) with its
    microbatch half-way (forward done on the stage nodes, backward never coming). Once the membership
    shows it, the stage nodes close the iteration with the live origin's microbatch instead of waiting
    for the other one until the iteration timeout."""
    from lowband.node.pipeline.runtime import MicrobatchKey

    def path(origin: str) -> list[PathSpec]:
        return [PathSpec(0, (0, 1, 2, 3, 0), (origin, "n1", "n2", "n3", origin))]

    async def main() -> None:
        stages = _stages()
        nodes = [await start_node("oa", 0, stages[0], dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                  iteration_timeout_s=30.0, hop_timeout_s=5.0),
                 await start_node("ob", 0, init_stage(CFG, 0, S, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                  iteration_timeout_s=30.0, hop_timeout_s=5.0)]
        for s, node_id in ((1, "n1"), (2, "n2"), (3, "n3")):
            nodes.append(await start_node(node_id, s, stages[s], dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                          iteration_timeout_s=30.0, hop_timeout_s=5.0))
        stage_nodes = nodes[2:]
        try:
            install_schedule(nodes, {"oa": path("oa"), "ob": path("ob")}, epoch=1)
            assert [n.runtime.expected for n in stage_nodes] == [2, 2, 2]
            # ob's microbatch of iteration 0 went forward through every stage node; then ob died
            dead = MicrobatchKey("ob", 0, 0)
            for n in stage_nodes:
                await n.runtime.forward(dead, torch.randn(B, T, CFG.dim), epoch=1)
            await nodes[1].stop()
            start = time.monotonic()
            result = await asyncio.wait_for(nodes[0].agent.run_iteration(0, [_batch(1)]), 10)
            assert result.abandoned == 0 and len(result.losses) == 1
            assert all(n.runtime.iteration == 0 for n in stage_nodes)   # still waiting for ob's backward
            if change == "died":
                install_schedule([n for n in nodes if n.node_id != "ob"], {"oa": path("oa")}, epoch=2)
            else:   # the coordinator moved ob to stage 2 (its node object stands for the new role)
                nodes[1].stage = 2
                install_schedule(nodes, {"oa": path("oa")}, epoch=2, only=[n for n in nodes if n.node_id != "ob"])
            for _ in range(50):
                if all(n.runtime.iteration == 1 for n in stage_nodes):
                    break
                await asyncio.sleep(0.05)
            assert [n.runtime.iteration for n in stage_nodes] == [1, 1, 1]
            assert [n.runtime.steps_applied for n in stage_nodes] == [1, 1, 1]
            assert all(not n.runtime.holds(dead) for n in stage_nodes)
            assert time.monotonic() - start < 10.0   # the iteration timeout here is 30 s
        finally:
            for n in nodes:
                if n.node_id != "ob":
                    await n.stop()

    asyncio.run(main())


@pytest.mark.parametrize(("launched_under", "closes"), [(3, True), (5, False)])
def test_a_joiner_counts_an_iteration_launched_before_it_joined_by_what_reached_it(launched_under: int,
                                                                                 closes: bool) -> None:
    """A replica that joined at plan epoch 5 (two microbatches through it per iteration from then on) gets
    one microbatch of an iteration the origin launched under epoch 3, a plan that routed nothing here:
    once that one is done the iteration closes, instead of waiting a third of the iteration timeout for a
    second one that was sent elsewhere. Under its own plan it still waits for both."""
    from lowband.node.pipeline.runtime import MicrobatchKey

    async def main() -> int:
        node = await start_node("n1", 1, init_stage(CFG, 1, S, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                iteration_timeout_s=30.0)
        try:
            stages = {"origin": 0, "n1": 1, "n2": 2, "n3": 3}
            node.agent.set_schedule(Schedule(epoch=5, paths=[], addresses={}, stages=stages,
                                             visits={"origin": 2}))
            assert node.runtime.pending() == 2
            key = MicrobatchKey("origin", 0, 0)
            h = torch.randn(B, T, CFG.dim)
            out = await node.runtime.forward(key, h, epoch=launched_under)
            await node.runtime.backward(key, torch.ones_like(out))
            await asyncio.sleep(0.05)
            return node.runtime.iteration
        finally:
            await node.stop()

    assert asyncio.run(main()) == (1 if closes else 0)


@pytest.mark.parametrize("in_flight", [False, True])
def test_an_origin_seen_in_a_later_iteration_is_not_waited_for_in_the_open_one(in_flight: bool) -> None:
    """Two origins, one microbatch each through this stage node per iteration. Origin ``oa``'s microbatch of
    iteration 0 is done here; origin ``ob``'s first microbatch here is of iteration 1 (it skipped iteration
    0 catching up, or its microbatch of 0 was given up upstream). An origin launches an iteration only once
    every microbatch of the one before is done or abandoned, so nothing more of ob's comes for iteration 0:
    the node closes it at once and takes ob's microbatch, instead of waiting a third of the iteration
    timeout. A microbatch of ob's iteration 0 still unfinished here was given up by ob: it is dropped."""
    from lowband.node.pipeline.runtime import MicrobatchKey

    async def main() -> None:
        node = await start_node("n1", 1, init_stage(CFG, 1, S, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                iteration_timeout_s=30.0)
        try:
            stages = {"oa": 0, "ob": 0, "n1": 1, "n2": 2, "n3": 3}
            node.agent.set_schedule(Schedule(epoch=5, paths=[], addresses={}, stages=stages,
                                             visits={"oa": 1, "ob": 1}))
            h = torch.randn(B, T, CFG.dim)
            done, given_up = MicrobatchKey("oa", 0, 0), MicrobatchKey("ob", 0, 0)
            out = await node.runtime.forward(done, h, epoch=5)
            if in_flight:
                await node.runtime.forward(given_up, h, epoch=5)
            await node.runtime.backward(done, torch.ones_like(out))
            assert node.runtime.iteration == 0
            start = time.monotonic()
            await asyncio.wait_for(node.runtime.forward(MicrobatchKey("ob", 1, 0), h, epoch=5), 2.0)
            assert time.monotonic() - start < 2.0   # a third of the iteration timeout is 10 s
            assert node.runtime.iteration == 1 and node.runtime.steps_applied == 1
            assert not node.runtime.holds(given_up)
        finally:
            await node.stop()

    asyncio.run(main())


@pytest.mark.parametrize("origin_finished", [True, False])
def test_a_stalled_stage_node_asks_the_origin_whether_more_of_the_iteration_comes(origin_finished: bool) -> None:
    """The plan routes two of the origin's microbatches per iteration through n1; one is done here, the
    other was given up before it reached n1 and the abandon notice never came. After a second without
    progress n1 asks the origin (IterationStatus); once the origin has finished that iteration, n1 closes
    it with what it has, long before the iteration timeout. An origin still in it keeps n1 waiting."""
    from lowband.node.pipeline.runtime import MicrobatchKey

    async def main() -> tuple[int, float]:
        origin = await start_node("oa", 0, init_stage(CFG, 0, S, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                  iteration_timeout_s=30.0)
        node = await start_node("n1", 1, init_stage(CFG, 1, S, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len,
                                iteration_timeout_s=30.0)
        asking = asyncio.create_task(node.agent.ask_origins(after_s=0.5, poll_s=0.1))
        try:
            path = PathSpec(0, (0, 1, 2, 3, 0), ("oa", "n1", "n2", "n3", "oa"))
            install_schedule([origin, node], {"oa": [path, PathSpec(1, path.stages, path.node_ids)]}, epoch=1)
            assert node.runtime.pending() == 2
            key = MicrobatchKey("oa", 0, 0)
            out = await node.runtime.forward(key, torch.randn(B, T, CFG.dim), epoch=1)
            await node.runtime.backward(key, torch.ones_like(out))
            if origin_finished:
                origin.runtime.jump_to(1)   # the origin's iteration 0 is over (its other microbatch given up)
            start = time.monotonic()
            for _ in range(40):
                if node.runtime.iteration == 1:
                    break
                await asyncio.sleep(0.1)
            return node.runtime.iteration, time.monotonic() - start
        finally:
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)
            await node.stop()
            await origin.stop()

    iteration, waited = asyncio.run(main())
    if origin_finished:
        assert iteration == 1 and waited < 3.0   # the iteration timeout is 30 s
    else:
        assert iteration == 0


def test_iteration_status_answers_only_for_this_run_and_only_from_an_origin() -> None:
    async def main() -> None:
        origin = await start_node("oa", 0, init_stage(CFG, 0, S, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len)
        node = await start_node("n1", 1, init_stage(CFG, 1, S, seed=0), dim=CFG.dim, max_seq_len=CFG.max_seq_len)
        try:
            ask = node_pb2.IterationStatusRequest(run_id=RUN_ID, iteration=0, node_id="n1")
            reply = await node.transport.iteration_status(origin.address, ask, timeout_s=5)
            assert not reply.finished and reply.open_iteration == 0
            origin.runtime.jump_to(3)
            reply = await node.transport.iteration_status(origin.address, ask, timeout_s=5)
            assert reply.finished and reply.open_iteration == 3
            for address, request in ((origin.address, node_pb2.IterationStatusRequest(run_id="other", iteration=0)),
                                     (node.address, ask)):   # n1 is no origin
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await origin.transport.iteration_status(address, request, timeout_s=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert origin.runtime.iteration == 3 and node.runtime.iteration == 0   # asking changed nothing
        finally:
            await node.stop()
            await origin.stop()

    asyncio.run(main())
