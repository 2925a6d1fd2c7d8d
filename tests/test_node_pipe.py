"""Activation pipes (gRPC): whole microbatches over one long-lived stream per peer and direction.

A real NodeServicer on port 0 in this process, with a recording agent in place of the pipeline agent.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from lowband.node.pipeline.transport import Transport, channel_options, single_message_bytes
from lowband.node.service import NodeServicer, start_server
from lowband.protocols import node_pb2, tensor_pb2
from lowband.protocols.chunking import stream_checksum
from lowband.protocols.codec import decode, encode
from lowband.protocols.errors import ValidationError
from lowband.protocols.rpc import TokenAuthInterceptor

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


def test_microbatches_share_one_pipe_per_direction_and_arrive_intact() -> None:
    async def main() -> None:
        server, servicer, address = await _node()
        transport = Transport(TOKEN, wire=False)
        try:
            xs = [torch.randn(2, 3, 8) for _ in range(6)]
            for i, x in enumerate(xs):
                ack = await transport.send_microbatch(address, i % 2 == 1, _header(i), encode(x, "fp32"), timeout_s=10)
                assert ack.ok
            # concurrent sends to the same peer: one message in flight per pipe, every one acknowledged
            acks = await asyncio.gather(*(transport.send_microbatch(address, False, _header(100 + i),
                                                                    encode(xs[0], "bf16"), timeout_s=10)
                                          for i in range(8)))
            assert all(a.ok for a in acks)
            assert set(transport._pipes) == {(address, False), (address, True)}
            got = servicer.agent.got  # type: ignore[union-attr]
            assert [(mb, bw) for mb, bw, _ in got[:6]] == [(i, i % 2 == 1) for i in range(6)]
            for (_, _, h), x in zip(got[:6], xs, strict=True):
                torch.testing.assert_close(h, x, rtol=0, atol=0)
            assert sorted(mb for mb, _, _ in got[6:]) == list(range(100, 108))
            assert servicer.bytes_received == transport.activation_bytes_sent
        finally:
            await transport.close()
            await server.stop(None)
    asyncio.run(main())


def test_refused_and_corrupted_messages_get_a_negative_ack_and_the_pipe_goes_on() -> None:
    async def main() -> None:
        server, servicer, address = await _node()
        transport = Transport(TOKEN, wire=False)
        try:
            x = torch.randn(2, 3, 8)
            ack = await transport.send_microbatch(address, False, _header(13), encode(x, "fp32"), timeout_s=10)
            assert not ack.ok and "13 is refused" in ack.message
            # a flipped payload bit: the codec checksum catches it, the stream goes on
            msg = encode(x, "fp32")
            data = bytearray(msg.SerializeToString())
            data[-3] ^= 0x10
            pipe = transport._pipe(address, False)
            await pipe.call.write(single_message_bytes(_header(1), bytes(data), stream_checksum(msg)))
            reply = await pipe.call.read()
            assert not reply.ok and "checksum" in reply.message
            # a message without a header
            await pipe.call.write(node_pb2.MicrobatchChunk().SerializeToString())
            reply = await pipe.call.read()
            assert not reply.ok and "header" in reply.message
            ack = await transport.send_microbatch(address, False, _header(2), encode(x, "fp32"), timeout_s=10)
            assert ack.ok and [mb for mb, _, _ in servicer.agent.got] == [2]  # type: ignore[union-attr]
            assert len(transport._pipes) == 1                                 # the same pipe throughout
        finally:
            await transport.close()
            await server.stop(None)
    asyncio.run(main())


def test_large_tensors_are_chunked_over_a_stream() -> None:
    async def main() -> None:
        server, servicer, address = await _node()
        transport = Transport(TOKEN, chunk_bytes=4096, wire=False)
        try:
            x = torch.randn(4, 16, 64)   # 16 KiB in fp32: 5 chunks
            ack = await transport.send_microbatch(address, False, _header(3), encode(x, "fp32"), timeout_s=10)
            assert ack.ok and not transport._pipes
            torch.testing.assert_close(servicer.agent.got[0][2], x, rtol=0, atol=0)  # type: ignore[union-attr]
        finally:
            await transport.close()
            await server.stop(None)
    asyncio.run(main())


def test_pipe_reopens_after_the_peer_restarts() -> None:
    async def main() -> None:
        server, _, address = await _node()
        port = int(address.rsplit(":", 1)[1])
        transport = Transport(TOKEN, wire=False)
        x = torch.randn(2, 3, 8)
        try:
            assert (await transport.send_microbatch(address, False, _header(1), encode(x, "fp32"), timeout_s=10)).ok
            await server.stop(None)
            with pytest.raises(grpc.aio.AioRpcError) as info:   # the peer is down: an error, not a hang
                await transport.send_microbatch(address, False, _header(2), encode(x, "fp32"), timeout_s=3)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            server, servicer, address = await _node(port)
            ack = None
            for _attempt in range(50):   # the channel reconnects with its own backoff
                try:
                    ack = await transport.send_microbatch(address, False, _header(3), encode(x, "fp32"), timeout_s=3)
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
        server, _, address = await _node(agent=False)
        transport = Transport(TOKEN, wire=False)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await transport.send_microbatch(address, False, _header(1), encode(torch.ones(1, 2, 8)), timeout_s=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await transport.close()
            await server.stop(None)
    asyncio.run(main())


def test_peer_without_pipes_gets_streamed_calls() -> None:
    """A node that predates pipes answers UNIMPLEMENTED; the sender streams to it from then on."""
    async def main() -> None:
        servicer = NodeServicer("old")
        servicer.agent = RecordingAgent()  # type: ignore[assignment]
        handler = grpc.method_handlers_generic_handler("lowband.Node", {
            "Forward": grpc.stream_unary_rpc_method_handler(
                servicer.Forward, request_deserializer=node_pb2.MicrobatchChunk.FromString,
                response_serializer=node_pb2.NodeAck.SerializeToString)})
        server = grpc.aio.server(interceptors=[TokenAuthInterceptor(TOKEN)], options=channel_options())
        server.add_generic_rpc_handlers((handler,))
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        transport = Transport(TOKEN, wire=False)
        try:
            x = torch.randn(2, 3, 8)
            for mb in (1, 2):
                assert (await transport.send_microbatch(address, False, _header(mb), encode(x), timeout_s=10)).ok
            assert address in transport._stream_only
            assert [mb for mb, _, _ in servicer.agent.got] == [1, 2]  # type: ignore[union-attr]
        finally:
            await transport.close()
            await server.stop(None)
    asyncio.run(main())
