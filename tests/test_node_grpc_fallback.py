"""The gRPC fallback of the activation hop: Forward/Backward calls that stream a microbatch's message in chunks.

A real NodeServicer on port 0 in this process, with a recording agent in place of the pipeline agent; the
transport has its activation wire turned off, so every hop takes the fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import torch

from lowband.node.pipeline.transport import Transport
from lowband.node.service import NodeServicer, start_server
from lowband.protocols import node_pb2, tensor_pb2
from lowband.protocols.codec import decode
from lowband.protocols.errors import ValidationError

TOKEN = "pipe-token"
pytestmark = [pytest.mark.timeout(90), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]


class RecordingAgent:
    """Decodes what arrives (as the pipeline agent does) and keeps it; refuses microbatch 13."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bool, torch.Tensor]] = []

    def accept(self, header: node_pb2.MicrobatchHeader, tensor: tensor_pb2.Tensor, *, backward: bool) -> None:
        h = decode(tensor)
        if header.microbatch == 13:
            raise ValidationError("microbatch 13 is refused")
        self.got.append((header.microbatch, backward, h))


def _header(mb: int) -> node_pb2.MicrobatchHeader:
    return node_pb2.MicrobatchHeader(run_id="r", iteration=1, microbatch=mb, origin_id="o", stages=[0, 1, 0],
                                     node_ids=["o", "n", "o"], hop=1)


async def _node(port: int = 0, agent: bool = True) -> tuple[grpc.aio.Server, NodeServicer, str]:
    servicer = NodeServicer("n")
    if agent:
        servicer.agent = RecordingAgent()  # type: ignore[assignment]
    server, bound = await start_server(servicer, f"127.0.0.1:{port}", TOKEN)
    return server, servicer, f"127.0.0.1:{bound}"


@asynccontextmanager
async def _fallback(agent: bool = True, **transport_options: Any) -> AsyncIterator[tuple[NodeServicer, str, Transport]]:
    """A node and a transport that never tries the wire; both closed however the block ends."""
    server, servicer, address = await _node(agent=agent)
    transport = Transport(TOKEN, wire=False, **transport_options)
    try:
        yield servicer, address, transport
    finally:
        await transport.close()
        await server.stop(None)


def test_microbatches_arrive_intact_in_both_directions_and_are_counted_alike() -> None:
    async def main() -> None:
        async with _fallback() as (servicer, address, transport):
            xs = [torch.randn(2, 3, 8) for _ in range(6)]
            codecs = ["fp32", "bf16", "int8", "fp32", "fp4", "fp16"]
            for i, (x, codec) in enumerate(zip(xs, codecs, strict=True)):
                ack = await transport.send_microbatch(address, i % 2 == 1, _header(i), x, codec, timeout_s=10)
                assert ack.ok, ack.message
            acks = await asyncio.gather(*(transport.send_microbatch(address, False, _header(100 + i), xs[0], "bf16",
                                                                    timeout_s=10) for i in range(8)))
            assert all(a.ok for a in acks)
            got = servicer.agent.got  # type: ignore[union-attr]
            assert [(mb, bw) for mb, bw, _ in got[:6]] == [(i, i % 2 == 1) for i in range(6)]
            torch.testing.assert_close(got[0][2], xs[0], rtol=0, atol=0)
            assert got[1][2].dtype == torch.bfloat16 and torch.equal(got[1][2], xs[1].to(torch.bfloat16))
            torch.testing.assert_close(got[2][2], xs[2], atol=0.05, rtol=0.05)
            assert sorted(mb for mb, _, _ in got[6:]) == list(range(100, 108))
            assert servicer.bytes_received == transport.activation_bytes_sent == transport.bytes_sent
    asyncio.run(main())


def test_a_refused_microbatch_gets_a_negative_ack() -> None:
    async def main() -> None:
        async with _fallback() as (servicer, address, transport):
            x = torch.randn(2, 3, 8)
            ack = await transport.send_microbatch(address, False, _header(13), x, "fp32", timeout_s=10)
            assert not ack.ok and "13 is refused" in ack.message
            ack = await transport.send_microbatch(address, False, _header(2), x, "fp32", timeout_s=10)
            assert ack.ok and [mb for mb, _, _ in servicer.agent.got] == [2]  # type: ignore[union-attr]
    asyncio.run(main())


def test_large_tensors_are_chunked_over_the_stream() -> None:
    async def main() -> None:
        async with _fallback(chunk_bytes=4096) as (servicer, address, transport):
            x = torch.randn(4, 16, 64)   # 16 KiB in fp32: 5 chunks
            ack = await transport.send_microbatch(address, False, _header(3), x, "fp32", timeout_s=10)
            assert ack.ok
            torch.testing.assert_close(servicer.agent.got[0][2], x, rtol=0, atol=0)  # type: ignore[union-attr]
            assert servicer.bytes_received == transport.activation_bytes_sent
    asyncio.run(main())


def test_a_restarted_peer_is_reached_again() -> None:
    async def main() -> None:
        server, _, address = await _node()
        port = int(address.rsplit(":", 1)[1])
        transport = Transport(TOKEN, wire=False)
        x = torch.randn(2, 3, 8)
        try:
            assert (await transport.send_microbatch(address, False, _header(1), x, "fp32", timeout_s=10)).ok
            await server.stop(None)
            with pytest.raises(grpc.aio.AioRpcError) as info:   # the peer is down: an error, not a hang
                await transport.send_microbatch(address, False, _header(2), x, "fp32", timeout_s=3)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            server, servicer, address = await _node(port)
            ack = None
            for _attempt in range(50):   # the channel reconnects with its own backoff
                try:
                    ack = await transport.send_microbatch(address, False, _header(3), x, "fp32", timeout_s=3)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
            assert ack is not None and ack.ok
            assert [mb for mb, _, _ in servicer.agent.got] == [3]  # type: ignore[union-attr]
        finally:
            await transport.close()
            await server.stop(None)
    asyncio.run(main())


def test_node_without_stage_answers_unavailable() -> None:
    async def main() -> None:
        async with _fallback(agent=False) as (_, address, transport):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await transport.send_microbatch(address, False, _header(1), torch.ones(1, 2, 8), "fp32", timeout_s=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    asyncio.run(main())
