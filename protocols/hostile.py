"""Hostile bytes on a gRPC server: malformed protobuf answered INVALID_ARGUMENT, garbage senders cooled down.

grpc.aio parses a request before the handler runs; bytes that do not parse end
the call with UNKNOWN and a full traceback in the log, on every call. The
``HostileInputInterceptor`` therefore takes each handler's request deserializer
out (grpc hands the handler raw bytes) and parses inside the call, for unary and
streamed requests alike:

* bytes that do not parse: INVALID_ARGUMENT, one rate-limited log line per peer
  (``peer_guard.BAD_INPUT_LOG``), and a strike against the peer's host;
* a handler's own ``ValidationError`` that it did not map itself: INVALID_ARGUMENT
  (no strike: honest peers can send a message that fails validation);
* a host cooling down (``peer_guard.PeerGuard``): RESOURCE_EXHAUSTED before
  anything is read, the status gRPC uses for rate limits and one clients do not
  retry by default.

Oversized messages never get this far: ``rpc.grpc_options`` bounds
``grpc.max_receive_message_length``, and gRPC refuses a message whose length prefix
is over the bound (RESOURCE_EXHAUSTED) before reading its body.

Install it first, before ``TokenAuthInterceptor``, so a cooling-down peer is refused
before anything else runs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from lowband.protocols.errors import ValidationError
from lowband.protocols.peer_guard import BAD_INPUT_LOG, GuardPolicy, PeerGuard, PeerLog, peer_host

Deserializer = Callable[[bytes], Any]
_MAX_CACHED = 256   # wrapped handlers kept; a server has a few dozen methods
Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


class HostileInputInterceptor(grpc.aio.ServerInterceptor):
    """Parses requests inside the call so bad bytes get INVALID_ARGUMENT; refuses hosts that keep sending them."""

    def __init__(self, policy: GuardPolicy | None = None, *, guard: PeerGuard | None = None,
                 log: PeerLog = BAD_INPUT_LOG) -> None:
        self.guard = guard or PeerGuard(policy)
        self.log = log
        # wrapped handlers by method and the handler object they wrap (stable): no new closures per call
        self._wrapped: dict[tuple[str, int], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method or "?"
        key = (method, id(handler))
        cached = self._wrapped.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) >= _MAX_CACHED:
            self._wrapped.clear()
        self._wrapped[key] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse: Deserializer | None = handler.request_deserializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_request(handler.stream_stream, method, parse, streams=True),
                response_serializer=handler.response_serializer)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_request(handler.stream_unary, method, parse, streams=False),
                response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_request(handler.unary_stream, method, parse, streams=True),
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary_request(handler.unary_unary, method, parse, streams=False),
            response_serializer=handler.response_serializer)

    # ------------------------------------------------------------------ refusals

    async def _admit(self, context: grpc.aio.ServicerContext, method: str) -> str:
        """The caller's host, after refusing it if it is cooling down."""
        host = peer_host(context.peer() or "")
        left = self.guard.cooling_down(host)
        if left:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"refused for {left:.0f} s more: this peer sent too many malformed messages")
        return host

    async def _malformed(self, context: grpc.aio.ServicerContext, host: str, method: str,
                         exc: BaseException) -> NoReturn:
        if self.guard.strike(host):
            self.log.warning(host, "peer %s cooled down for %.0f s after %d malformed messages (last on %s)",
                             host, self.guard.policy.cooldown_s, self.guard.policy.strikes, method, always=True)
        else:
            self.log.warning(host, "malformed %s from %s: %s", method, host, _one_line(exc))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request for {method}")
        raise AssertionError("context.abort returned")

    async def _invalid(self, context: grpc.aio.ServicerContext, host: str, method: str,
                       exc: ValidationError) -> NoReturn:
        self.log.warning(host, "invalid %s from %s: %s", method, host, _one_line(exc))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid argument: {exc}")
        raise AssertionError("context.abort returned")

    # ------------------------------------------------------------------ wrappers

    def _unary_request(self, behavior: Behavior, method: str, parse: Deserializer | None,
                       *, streams: bool) -> Behavior:
        async def parsed(raw: Any, context: grpc.aio.ServicerContext, host: str) -> Any:
            if parse is None:
                return raw
            try:
                return parse(raw)
            except Exception as exc:   # whatever the parser raises, the bytes are malformed
                await self._malformed(context, host, method, exc)

        if streams and inspect.isasyncgenfunction(behavior):
            async def unary_stream(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                host = await self._admit(context, method)
                request = await parsed(raw, context, host)
                try:
                    async for reply in behavior(request, context):
                        yield reply
                except ValidationError as exc:
                    await self._invalid(context, host, method, exc)

            return unary_stream

        async def unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            host = await self._admit(context, method)
            request = await parsed(raw, context, host)
            try:
                return await _settled(behavior(request, context))
            except ValidationError as exc:
                await self._invalid(context, host, method, exc)

        return unary

    def _stream_request(self, behavior: Behavior, method: str, parse: Deserializer | None,
                        *, streams: bool) -> Behavior:
        def requests(raw_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                     host: str) -> AsyncIterator[Any]:
            if parse is None:
                return raw_iterator

            async def parsed() -> AsyncIterator[Any]:
                async for raw in raw_iterator:
                    try:
                        message = parse(raw)
                    except Exception as exc:   # whatever the parser raises, the bytes are malformed
                        await self._malformed(context, host, method, exc)
                    yield message

            return parsed()

        if streams and inspect.isasyncgenfunction(behavior):
            async def stream_stream(raw_iterator: AsyncIterator[Any],
                                    context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                host = await self._admit(context, method)
                try:
                    async for reply in behavior(requests(raw_iterator, context, host), context):
                        yield reply
                except ValidationError as exc:
                    await self._invalid(context, host, method, exc)

            return stream_stream

        async def stream(raw_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            host = await self._admit(context, method)
            try:
                return await _settled(behavior(requests(raw_iterator, context, host), context))
            except ValidationError as exc:
                await self._invalid(context, host, method, exc)

        return stream


async def _settled(result: Any) -> Any:
    """A handler's result, awaited if it is a coroutine (grpc.aio also accepts plain functions)."""
    return await result if inspect.isawaitable(result) else result


def _one_line(exc: BaseException) -> str:
    """An exception as one short log line (no traceback, no newlines from a parser's message)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"
