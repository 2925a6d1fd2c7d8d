"""A Node service that serves only ReduceShard, for DiLoCo averaging tests on real gRPC."""

from __future__ import annotations

import grpc

from lowband.node.sync.grpc_averager import ShardReducer
from lowband.protocols import node_pb2_grpc
from lowband.protocols.rpc import TokenAuthInterceptor, grpc_options


class ReduceOnlyServicer(node_pb2_grpc.NodeServicer):
    """The Node service with only ReduceShard, delegated like the daemon's servicer does."""

    def __init__(self, reducer: ShardReducer) -> None:
        self.reducer = reducer

    async def ReduceShard(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for reply in self.reducer.handle(request_iterator, context):
            yield reply


async def start_reduce_server(reducer: ShardReducer, token: str) -> tuple[grpc.aio.Server, str]:
    """A server on a free loopback port; returns it and its address."""
    server = grpc.aio.server(interceptors=[TokenAuthInterceptor(token)], options=grpc_options())
    node_pb2_grpc.add_NodeServicer_to_server(ReduceOnlyServicer(reducer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
