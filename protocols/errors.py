"""One typed error for bad input from a peer, and its mapping to gRPC status.

Everything that decodes or reassembles a peer's message raises ``ValidationError``
and nothing else, so a servicer needs one ``except`` to turn any malformed
message into INVALID_ARGUMENT instead of a crash or an opaque INTERNAL error.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from lowband.protocols.peer_guard import BAD_INPUT_LOG, peer_host

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class ValidationError(ValueError):
    """A message (tensor, chunk stream, field) is malformed, oversized or out of range."""


async def abort_invalid(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Abort the current RPC with INVALID_ARGUMENT carrying the validation message (logged as one line,
    rate-limited per peer: a peer repeating a bad request must not flood the log)."""
    host = peer_host(context.peer() or "")
    BAD_INPUT_LOG.warning(host, "rejecting invalid request from %s: %s", host, exc)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid argument: {exc}")
    raise AssertionError("context.abort returned")  # abort always raises; keeps NoReturn honest


def invalid_argument_on_validation_error(method: F) -> F:
    """Decorate a grpc.aio servicer method so a ValidationError becomes INVALID_ARGUMENT.

    Works for coroutine methods (unary or stream-request) and async-generator
    methods (stream-response). The servicer signature is
    ``(self, request_or_iterator, context)``; `context` is the last positional arg.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def gen_wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            context = kwargs.get("context", args[-1] if args else None)
            try:
                async for item in method(*args, **kwargs):
                    yield item
            except ValidationError as exc:
                await abort_invalid(context, exc)

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context", args[-1] if args else None)
        try:
            return await method(*args, **kwargs)
        except ValidationError as exc:
            await abort_invalid(context, exc)

    return wrapper  # type: ignore[return-value]
