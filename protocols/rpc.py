"""gRPC plumbing shared by every service: run-token auth, message-size bounds, event loop.

Every RPC carries the run token in the ``lowband-token`` metadata key. Servers
install ``TokenAuthInterceptor``; a wrong or missing token is refused with
UNAUTHENTICATED before any handler runs, so nothing changes. The standard
health service is exempt so generic probes work.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

TOKEN_METADATA_KEY = "lowband-token"
TOKEN_ENV_VAR = "LOWBAND_TOKEN"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # chunks are 1 MiB; anything far larger is refused
_UNAUTHENTICATED_EXEMPT = ("/grpc.health.v1.Health/",)


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Channel and server options: bounded message sizes, keepalive for flaky links."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Server side: accept the clients' keepalive pings instead of answering
        # GOAWAY "too_many_pings" (the default minimum interval is 5 minutes).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, token),)


def load_token(token_file: str | None = None) -> str:
    """The run token from `token_file`, else the LOWBAND_TOKEN environment variable."""
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read token file {path}: {exc.strerror}") from exc
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV_VAR, "").strip()
    if not token:
        raise ValueError(f"no run token: pass --token-file or set {TOKEN_ENV_VAR}")
    return token


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose `lowband-token` metadata does not match the run token."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("run token must not be empty")
        self._token = token.encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")

        async def deny_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(deny_stream),
        }

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(_UNAUTHENTICATED_EXEMPT):
            return await continuation(handler_call_details)
        supplied = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                supplied = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(supplied, self._token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._deny[(handler.request_streaming, handler.response_streaming)]


def install_uvloop() -> None:
    """Use uvloop for asyncio where available (it is a core dependency on POSIX)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-POSIX platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
