"""The node's side of the coordinator: join, heartbeat, leave, schedule, reports, sync rounds.

Every call has an explicit timeout (``rpc_timeout_s``, 5 s by default: the
coordinator answers in milliseconds, so anything slower is a problem worth
retrying). Calls that must eventually succeed (join, schedule) retry with
exponential backoff, capped, for as long as the node runs; a coordinator that
is down never stops the node from serving its peers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.rpc import grpc_options, token_metadata
from lowband.protocols.tls import COORDINATOR_NAME, TlsConfig, open_channel

logger = logging.getLogger(__name__)

R = TypeVar("R")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


class Backoff:
    """Exponential backoff with jitter: initial, x2 per failure, capped; reset on success."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 5.0) -> None:
        if initial_s <= 0 or max_s < initial_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * (2 ** self.failures))
        self.failures += 1
        return delay * (0.75 + 0.5 * random.random())

    def reset(self) -> None:
        self.failures = 0


class CoordinatorClient:
    """A channel to the coordinator carrying the run token; with ``tls``, mutual TLS that checks the
    coordinator's certificate names ``COORDINATOR_NAME``."""

    def __init__(self, address: str, token: str, *, rpc_timeout_s: float = 5.0,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 5.0, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.metadata = token_metadata(token)
        self._channel = open_channel(address, grpc_options(), tls, server_name=COORDINATOR_NAME)
        self.stub = pb_grpc.CoordinatorStub(self._channel)
        # The long-lived HeartbeatStream call, None while broken; reopened after a backoff.
        self._hb_call: grpc.aio.StreamStreamCall | None = None
        self._hb_backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._hb_retry_at = 0.0
        self._hb_lock = asyncio.Lock()
        self.stream_heartbeats = 0     # heartbeats answered over the stream
        self.unary_heartbeats = 0      # heartbeats answered by unary fallback
        self.bytes_sent = 0            # requests sent to the coordinator (serialized): control traffic

    async def close(self) -> None:
        self._drop_heartbeat_stream()
        await self._channel.close(grace=None)

    async def call(self, method: Callable[..., Awaitable[R]], request: Any, *, timeout_s: float | None = None) -> R:
        """One attempt; raises grpc.aio.AioRpcError."""
        self.bytes_sent += request.ByteSize()
        return await method(request, timeout=timeout_s or self.rpc_timeout_s, metadata=self.metadata)

    async def call_retrying(self, method: Callable[..., Awaitable[R]], request: Any, *,
                            stop: asyncio.Event | None = None, what: str = "call") -> R | None:
        """Retry retryable failures with capped exponential backoff until success or ``stop`` is set.

        Returns None when stopped; non-retryable errors (bad token, invalid request) raise.
        """
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        while stop is None or not stop.is_set():
            try:
                return await self.call(method, request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                delay = backoff.next_delay()
                logger.warning("coordinator %s: %s failed (%s); retrying in %.1f s", self.address, what,
                               exc.code().name, delay)
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
        return None

    async def join(self, request: pb.JoinRequest, stop: asyncio.Event | None = None) -> pb.JoinReply | None:
        return await self.call_retrying(self.stub.Join, request, stop=stop, what="join")

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        """One heartbeat, over the long-lived ``HeartbeatStream`` when it is up (a fraction of a unary
        call's cost to the coordinator, which serves every node). When the stream breaks (coordinator restart, bad
        request, timeout) this heartbeat goes unary at once, so the lease does not lapse, and the
        stream is reopened on a later heartbeat after a backoff. Raises grpc.aio.AioRpcError when
        the unary call fails too."""
        async with self._hb_lock:
            if self._hb_call is None and time.monotonic() >= self._hb_retry_at:
                self._hb_call = self.stub.HeartbeatStream(metadata=self.metadata)
            call = self._hb_call
            if call is not None:
                try:
                    self.bytes_sent += request.ByteSize()
                    reply = await asyncio.wait_for(self._stream_heartbeat(call, request), self.rpc_timeout_s)
                    self._hb_backoff.reset()
                    self.stream_heartbeats += 1
                    return reply
                except (grpc.RpcError, asyncio.InvalidStateError, TimeoutError, EOFError) as exc:
                    delay = self._hb_backoff.next_delay()
                    self._hb_retry_at = time.monotonic() + delay
                    self._drop_heartbeat_stream()
                    detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                    logger.info("heartbeat stream to %s broke (%s); unary until it reopens in %.1f s",
                                self.address, detail, delay)
            reply = await self.call(self.stub.Heartbeat, request)
            self.unary_heartbeats += 1
            return reply

    @staticmethod
    async def _stream_heartbeat(call: grpc.aio.StreamStreamCall, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        await call.write(request)
        reply = await call.read()
        if reply is grpc.aio.EOF:
            raise EOFError("coordinator closed the heartbeat stream")
        return reply

    def _drop_heartbeat_stream(self) -> None:
        call, self._hb_call = self._hb_call, None
        if call is not None:
            call.cancel()

    async def leave(self, node_id: str, reason: str, metrics: pb.NodeMetrics | None = None,
                    timeout_s: float = 2.0) -> bool:
        """Best effort: a leaving node does not wait long for a coordinator that is down."""
        try:
            await self.call(self.stub.Leave, pb.LeaveRequest(node_id=node_id, reason=reason, metrics=metrics),
                            timeout_s=timeout_s)
            return True
        except grpc.aio.AioRpcError as exc:
            logger.warning("leave not acknowledged: %s", exc.code().name)
            return False

    async def schedule(self, node_id: str, stop: asyncio.Event | None = None) -> pb.ScheduleReply | None:
        return await self.call_retrying(self.stub.GetSchedule, pb.ScheduleRequest(node_id=node_id), stop=stop,
                                        what="schedule")

    async def report_failure(self, reporter_id: str, suspect_id: str, reason: str) -> None:
        try:
            await self.call(self.stub.ReportFailure,
                            pb.FailureReport(reporter_id=reporter_id, suspect_id=suspect_id, reason=reason[:500]))
        except grpc.aio.AioRpcError as exc:
            logger.warning("failure report about %s not delivered: %s", suspect_id, exc.code().name)

    async def report_recovery(self, node_id: str, plan_id: int, success: bool, message: str = "") -> None:
        try:
            await self.call(self.stub.ReportRecovery, pb.RecoveryReport(node_id=node_id, plan_id=plan_id,
                                                                        success=success, message=message[:500]))
        except grpc.aio.AioRpcError as exc:
            logger.warning("recovery report for plan %d not delivered: %s", plan_id, exc.code().name)

    async def join_sync_round(self, request: pb.SyncRoundRequest) -> pb.SyncRoundReply:
        return await self.call(self.stub.JoinSyncRound, request)

    async def report_links(self, request: pb.LinkReport) -> None:
        try:
            await self.call(self.stub.ReportLinks, request)
        except grpc.aio.AioRpcError as exc:
            logger.debug("link report not delivered: %s", exc.code().name)
