"""The coordinator's gRPC server: a thin servicer over `Coordinator`, plus lease and flush loops.

In-process use (tests, the simulator)::

    server = await start_coordinator(config, run_dir, token)       # port 0 by default
    ... connect to f"127.0.0.1:{server.port}" ...
    await server.stop()

The standard gRPC health service (grpc.health.v1) is registered and exempt
from the run token, so generic probes work. With ``http=HOST:PORT`` the
dashboard (coordinator/dashboard.py) listens there too, on the same event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lowband.coordinator.core import Coordinator
from lowband.coordinator.dashboard import Dashboard
from lowband.coordinator.errors import Conflict, IdentityRefused, InvalidRequest, UnknownNode
from lowband.coordinator.planning import compute_plan
from lowband.coordinator.skippipe.schedule import Plan
from lowband.coordinator.store import Store
from lowband.coordinator.watch import SAMPLE_S, RunWatch
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.config import ConfigError, RunConfig
from lowband.protocols.hostile import HostileInputInterceptor
from lowband.protocols.peer_guard import BAD_INPUT_LOG, GuardPolicy, peer_host
from lowband.protocols.rpc import TokenAuthInterceptor, grpc_options
from lowband.protocols.text_corpus import DataError
from lowband.protocols.tls import TlsConfig, add_port, check_claimed_id, peer_name
from lowband.protocols.tokenizer import TokenizerError, run_tokenizer
from lowband.protocols.vocab import resolve_vocab

logger = logging.getLogger(__name__)

SERVICE_NAME = "lowband.Coordinator"
METRICS_FLUSH_S = 2.0


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Maps each RPC to one `Coordinator` method and its typed errors to gRPC status codes."""

    def __init__(self, core: Coordinator, watch: RunWatch) -> None:
        self.core = core
        self.watch = watch
        self._planning: tuple[int, asyncio.Future[Plan]] | None = None

    async def _ensure_plan(self) -> None:
        """Plan the current epoch in a worker thread (a SkipPipe search must not stall heartbeats).

        Concurrent callers share one computation per epoch. If membership keeps
        changing while planning, stop after a few rounds; the caller then gets
        the last plan with its (older) epoch and asks again after its next
        heartbeat says RELOAD_SCHEDULE.
        """
        for _ in range(3):
            if not self.core.plan_stale():
                return
            epoch = self.core.epoch
            if self._planning is None or self._planning[0] != epoch:
                inputs = self.core.plan_inputs()
                self._planning = (epoch, asyncio.ensure_future(asyncio.to_thread(compute_plan, inputs)))
            plan = await self._planning[1]
            if not self.core.install_plan(epoch, plan) and self.core.plan_stale():
                self.core.install_stale_plan(epoch, plan)

    async def _call(self, method: Callable[[Any], Any], request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return method(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownNode as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "not found")
        except Conflict as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except IdentityRefused as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))

    async def _check_id(self, context: grpc.aio.ServicerContext, claimed: str, what: str) -> None:
        """Under TLS a node speaks only as the node its certificate names (PERMISSION_DENIED otherwise)."""
        why = check_claimed_id(context, claimed)
        if why:
            BAD_INPUT_LOG.warning(peer_host(context.peer() or ""), "%s as %r refused: %s", what, claimed, why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{what} refused: {why}")

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        # Hot path: skip the generic wrapper's extra coroutine.
        await self._check_id(context, request.node_id, "heartbeat")
        try:
            return self.core.heartbeat(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def HeartbeatStream(self, request_iterator: AsyncIterator[pb.HeartbeatRequest],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.HeartbeatReply]:
        heartbeat = self.core.heartbeat
        name = peer_name(context)   # once per stream: the connection's certificate does not change
        async for request in request_iterator:
            if name is not None and request.node_id != name:
                await self._check_id(context, request.node_id, "heartbeat")
            try:
                reply = heartbeat(request)
            except InvalidRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            yield reply

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        name = peer_name(context)
        if name is not None:   # TLS: the certificate's name is the node's id and its identity
            if request.node_id:
                await self._check_id(context, request.node_id, "join")
            request.node_id, request.secret = name, b"x509:" + name.encode()
        return await self._call(self.core.join, request, context)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        await self._check_id(context, request.node_id, "leave")
        return await self._call(self.core.leave, request, context)

    async def GetSchedule(self, request: pb.ScheduleRequest, context: grpc.aio.ServicerContext) -> pb.ScheduleReply:
        if request.node_id in self.core.members:  # only known nodes may trigger planning work
            await self._ensure_plan()
        return await self._call(functools.partial(self.core.schedule, allow_stale=True), request, context)

    async def JoinSyncRound(self, request: pb.SyncRoundRequest,
                            context: grpc.aio.ServicerContext) -> pb.SyncRoundReply:
        await self._check_id(context, request.node_id, "sync round")
        return await self._call(self.core.sync_round, request, context)

    async def ReportFailure(self, request: pb.FailureReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        await self._check_id(context, request.reporter_id, "failure report")
        return await self._call(self.core.report_failure, request, context)

    async def ReportLinks(self, request: pb.LinkReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        await self._check_id(context, request.node_id, "link report")
        return await self._call(self.core.report_links, request, context)

    async def ReportRecovery(self, request: pb.RecoveryReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        await self._check_id(context, request.node_id, "recovery report")
        return await self._call(self.core.report_recovery, request, context)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        reply = await self._call(self.core.status, request, context)
        if request.document:
            reply.status_json = json.dumps(self.watch.document(max_events=request.max_events or 50))
        return reply


def resolve_config(store: Store, config: RunConfig) -> RunConfig:
    """The run's config: the one stored in the run directory wins, so a restart resumes the same run."""
    stored = store.get_meta("run_config")
    if stored is None:
        store.set_meta("run_config", config.to_json())
        return config
    resumed = RunConfig.from_json(stored)
    if resumed.to_json() != config.to_json():
        logger.warning("run directory holds a different run config; resuming with the stored one")
    return resumed


class CoordinatorServer:
    """A running coordinator: gRPC server, lease sweeper, metrics flusher, status sampler and dashboard."""

    def __init__(self, server: grpc.aio.Server, core: Coordinator, health_servicer: Any, host: str,
                 port: int, watch: RunWatch, dashboard: Dashboard | None = None) -> None:
        self.server = server
        self.core = core
        self.watch = watch
        self.dashboard = dashboard
        self.port = port
        self.address = f"{host}:{port}"
        self._health = health_servicer
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    def _start_loops(self) -> None:
        ms = self.core.config.membership
        sweep = max(0.02, min(ms.heartbeat_interval_s, ms.lease_s / 5.0))
        self._tasks = [asyncio.create_task(self._every(sweep, self.core.expire_leases), name="lease-sweeper"),
                       asyncio.create_task(self._every(METRICS_FLUSH_S, self.core.flush_metrics), name="flush"),
                       asyncio.create_task(self._every(SAMPLE_S, self.watch.sample), name="watch")]

    async def _every(self, period: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                fn()
            except Exception:  # a bug here must not stop leases from expiring forever
                logger.exception("periodic %s failed", getattr(fn, "__name__", fn))

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds), flush metrics and close SQLite."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.server.stop(grace)
        self.core.close()
        logger.info("coordinator on %s stopped", self.address)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_coordinator(
    config: RunConfig,
    run_dir: str | Path,
    token: str,
    bind: str = "127.0.0.1:0",
    *,
    control_socket: str | Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    http: str | None = None,
    viewer_token: str = "",
    metrics_open: bool = False,
    bad_input: GuardPolicy | None = None,
    tls: TlsConfig | None = None,
) -> CoordinatorServer:
    """Start a coordinator on `bind` (port 0 picks a free port), resuming from `run_dir` if it holds state.

    `control_socket`: also serve on this Unix socket (token still required), so a local supervisor
    reaches a coordinator whose network it does not share (the simulator's namespace hosts).
    `http`: HOST:PORT of the dashboard (coordinator/dashboard.py; `viewer_token` and `metrics_open` as
    there); None: no dashboard. `bad_input`: when a peer sending malformed messages is cooled down
    (protocols/peer_guard.py; None: its defaults). `tls`: mutual TLS on `bind` (protocols/tls.py: plaintext
    clients and certificates of another CA are refused; a node may speak only as its certificate's name);
    the control socket, a local file, stays plaintext behind the token."""
    store = Store(run_dir)
    try:
        config = resolve_config(store, config)
        # a BPE run's tokenizer: what `serve` trained into the run directory (else trained here), shared at join
        tokenizer = run_tokenizer(config, run_dir)
        config = resolve_vocab(config, tokenizer) if tokenizer is not None else config
        core = Coordinator(config, store, clock=clock, tokenizer=tokenizer)
    except (ConfigError, DataError, TokenizerError) as exc:
        store.close()
        raise exc if isinstance(exc, ConfigError) else ConfigError(f"train.tokenizer: {exc}") from None
    watch = RunWatch(core)
    interceptors = [HostileInputInterceptor(bad_input), TokenAuthInterceptor(token)]
    server = grpc.aio.server(interceptors=interceptors, options=grpc_options())
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(core, watch), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host = bind.rpartition(":")[0] or "127.0.0.1"
    try:
        port = add_port(server, bind, tls)
    except RuntimeError as exc:
        core.close()
        raise OSError(f"cannot bind {bind}: {exc}") from exc
    if port == 0:
        core.close()
        raise OSError(f"cannot bind {bind}")
    if control_socket is not None:
        Path(control_socket).unlink(missing_ok=True)   # left by a coordinator that was killed
        if server.add_insecure_port(f"unix:{control_socket}") == 0:
            core.close()
            raise OSError(f"cannot bind the control socket {control_socket}")
    dashboard = None
    if http is not None:
        dashboard = Dashboard(watch, token, viewer_token=viewer_token, metrics_open=metrics_open)
        try:
            await dashboard.start(http)
        except OSError as exc:
            core.close()
            raise OSError(f"cannot bind the dashboard on {http}: {exc}") from exc
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = CoordinatorServer(server, core, health_servicer, host, port, watch, dashboard)
    running._start_loops()
    logger.info("coordinator listening on %s (run dir %s, epoch %d, %s)", running.address, run_dir, core.epoch,
                "mutual TLS" if tls else "plaintext")
    return running
