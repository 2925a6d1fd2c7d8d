"""The node process: measure, join, hold a stage, serve and train, heartbeat, leave.

Lifecycle: start the gRPC server; measure compute
speed on a short run of one block; join the coordinator (retrying with capped
exponential backoff); obtain the stage's weights as the coordinator's plan says
(``fresh`` from the run seed so all replicas start equal, ``replica-copy`` from
a live replica over GetState, or a CheckFree rebuild); fetch the schedule;
then serve microbatches, drive iterations when an origin (stage 0), heartbeat
metrics, and follow instructions (reload the schedule, change stage, rejoin,
shut down). SIGTERM (the spot-preemption notice) and SIGINT leave cleanly and
exit 0. The run ends for a node after ``train.steps`` iterations.

The daemon is the lifecycle core; it composes the parts that do the work, once the first join
reply has brought the run config: ``StageAssembler`` (node/stage_assembly.py: build and serve a
stage), ``ScheduleKeeper`` (node/schedule_keeper.py), ``TrainLoop`` and ``OriginLoop``
(node/train_loop.py, node/origin_loop.py), the recovery steps under node/recovery/ (obtaining
weights, DiLoCo and standby resync, the bookend copy, GetState's provider), ``LinkProber``
(node/link_probe.py) and the metrics (node/metrics.py).

``--log-json`` records (one JSON object per line; every record has ``time``,
``kind``, ``node_id`` and ``stage`` once known): ``start`` (address, pid),
``join``, ``stage`` (method, iteration, ok), ``schedule`` (epoch, paths,
expected), ``metrics`` (each heartbeat: step, loss, tokens_per_s, bytes_sent,
bytes_received, activation_bytes_sent, grad_norm, val_loss, tokens,
outer_step, sync_bytes_sent, state_bytes_sent), ``step`` (every inner step: microbatches,
abandoned, grad_norm, lr, forced), ``iteration`` (origins: loss, abandoned,
tokens, seconds), ``eval`` (origins: val_loss), ``abandon`` (microbatch, reason,
suspect), ``failure`` (suspect reported to the coordinator), ``outer-sync`` /
``outer-merge`` / ``outer-skip`` / ``outer-resync`` / ``outer-adopt`` (DiLoCo), ``standby-resync`` (a
replica the plan leaves idle copies its group's state: source, outer_steps), ``bookend-copy``,
``final`` (after the last iteration: outer_steps and global_digest per fragment), ``leave`` (reason,
acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from lowband.node.address import advertised_address
from lowband.node.coordinator_client import Backoff, CoordinatorClient
from lowband.node.device_info import device_memory_bytes, measure_throughput
from lowband.node.event_log import EventLog
from lowband.node.identity import node_secret
from lowband.node.link_probe import LinkProber
from lowband.node.membership import Membership
from lowband.node.metrics import TrainingCounters, metrics_record, node_metrics
from lowband.node.metrics_http import NodeMetricsServer
from lowband.node.origin_loop import OriginLoop
from lowband.node.pipeline.runtime import StepResult
from lowband.node.pipeline.transport import LinkTable, Transport
from lowband.node.pipeline.wire import WireServer
from lowband.node.recovery.bookend import BookendCopy
from lowband.node.recovery.local_state import StateKeeper, describe_stored
from lowband.node.recovery.resync import OuterResync, StandbyResync
from lowband.node.recovery.state_source import StateSource
from lowband.node.schedule_keeper import ScheduleKeeper
from lowband.node.service import NodeServicer, start_server, start_wire
from lowband.node.stage_assembly import CurrentStage, StageAssembler, StageHooks
from lowband.node.sync.averaging_backend import require_backend
from lowband.node.tokenizer_cache import cached_sha256, tokenizer_from_join
from lowband.node.train.model import model_config_for
from lowband.node.train.reference import resolve_device
from lowband.node.train_loop import TrainLoop
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig
from lowband.protocols.rpc import install_uvloop
from lowband.protocols.tls import load_tls, set_process_tls

logger = logging.getLogger(__name__)

Kind = pb.Instruction.Kind
VERSION = "0.1.0"
LEAVE_TIMEOUT_S = 2.0        # a preempted node has ~seconds; do not wait long for the coordinator
STATE_FLUSH_TIMEOUT_S = 10.0  # the last --state-dir write at shutdown (one stage to disk)
# A join refused because a live node holds the id with another identity is retried this long: the same node
# restarted without its secret gets in once its old lease ends (seconds); an impostor never does.
IDENTITY_WAIT_S = 60.0


@dataclass(kw_only=True, slots=True)
class NodeOptions:
    """Everything the command line sets; the run config itself comes from the coordinator."""

    coordinator: str
    token: str
    listen: str = "127.0.0.1:0"
    advertise: str = ""           # address peers dial; default: listen host and bound port
    device: str = "cpu"
    data: str = ""                # overrides train.data for this node's corpus
    node_id: str = ""
    preferred_stage: int = -1
    has_data: bool = True
    slowdown: float = 1.0
    links_file: str = ""
    log_json: str = ""
    torch_threads: int = 1
    wire: bool = True             # activation wire beside gRPC (node/pipeline/wire.py); False: gRPC only (the chunked Forward/Backward streams)
    wire_port: int = 0            # the wire's TCP port on the listen host (0: any free port)
    metrics: str = ""             # HOST:PORT of the node's own Prometheus /metrics ('': none)
    state_dir: str = ""           # durable local state: the stage's θ_global and outer state after each outer sync
    tls_dir: str = ""             # mutual TLS: DIR/ca.crt and DIR/<node_id>.crt/.key (protocols/tls.py); '': plaintext


@dataclass(frozen=True, slots=True)
class RunParts:
    """What the node composes once the first join reply has brought the run config."""

    config: RunConfig
    heartbeat_s: float
    lease_s: float
    schedule: ScheduleKeeper
    stages: StageAssembler
    bookend: BookendCopy
    train: TrainLoop
    links: LinkProber | None      # None in data-parallel mode: a path is just its origin, the planner reads no links


class NodeDaemon:
    """One node process. ``await NodeDaemon(options).run()`` returns the exit code."""

    def __init__(self, options: NodeOptions) -> None:
        self.opts = options
        if options.tls_dir and not options.node_id:
            raise ValueError("--tls-dir needs --node-id: the node's id is its certificate's name")
        # with TLS the certificate is the node's identity; without, a secret it joins with (node/identity.py)
        self.tls = load_tls(options.tls_dir, options.node_id)
        self.secret = b"" if self.tls else node_secret(options.state_dir)
        set_process_tls(self.tls)   # also the averager's channels to its round's participants
        self.device = resolve_device(options.device)
        self.membership = Membership(node_id=options.node_id)
        self.events = EventLog(options.log_json)
        links = LinkTable(options.links_file) if options.links_file else None   # emulated links (simulator)
        self.transport = Transport(options.token, links=links, wire=options.wire, tls=self.tls)
        self.servicer = NodeServicer(options.node_id)
        self.client = CoordinatorClient(options.coordinator, options.token, tls=self.tls)
        self.current = CurrentStage()
        self.counters = TrainingCounters()
        self.stop_event = asyncio.Event()
        self.exit_reason = ""
        self.address = ""
        self._stored: pb.StoredStage | None = None   # the stage state --state-dir held at start
        self.parts: RunParts | None = None
        self._started_at = time.monotonic()
        self._throughput = 0.0
        self._server: grpc.aio.Server | None = None
        self._wire_server: WireServer | None = None
        self._handled_plans: set[int] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._heartbeat_rtt_s = 0.0
        self.metrics_server = NodeMetricsServer(self.metrics, self._identity) if options.metrics else None
        self.keeper: StateKeeper | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        torch.set_num_threads(max(1, self.opts.torch_threads))
        try:
            self._server, port = await start_server(self.servicer, self.opts.listen, self.opts.token, tls=self.tls)
            if self.opts.wire:
                self._wire_server = await start_wire(self.servicer, self.opts.listen.rpartition(":")[0],
                                                     self.opts.token, self.opts.wire_port, tls=self.tls)
            self.address = advertised_address(self.opts.listen, port, self.opts.advertise, self.opts.coordinator)
            if self.metrics_server is not None:
                try:
                    await self.metrics_server.start(self.opts.metrics)
                except OSError as exc:
                    raise ValueError(f"--metrics {self.opts.metrics}: {exc}") from exc
            self.events.write("start", address=self.address, pid=os.getpid(), device=str(self.device))
            throughput = await asyncio.to_thread(measure_throughput, self.device, self.opts.slowdown)
            logger.info("node listening on %s; throughput %.1f samples/s", self.address, throughput)
            reply = await self.join(throughput, stage=-1)
            if reply is None:
                return 0
            # Heartbeats first: building the stage may take a while and the lease is short.
            self._tasks = [asyncio.create_task(self._heartbeat_loop(), name="heartbeat")]
            await self._after_join(reply)
            parts = self._parts()
            self._tasks.append(asyncio.create_task(parts.train.run(), name="train"))
            if self.opts.state_dir:
                self.keeper = StateKeeper(self.opts.state_dir, self.current, run_id=parts.config.run_id,
                                          num_stages=parts.config.model.stages,
                                          model=dataclasses.asdict(parts.config.model))
                self._tasks.append(asyncio.create_task(self.keeper.run(self.stop_event), name="state"))
            if parts.links is not None:
                self._tasks.append(asyncio.create_task(parts.links.run(), name="links"))
            await self.stop_event.wait()
        finally:
            await self._shutdown()
        return 0

    def _on_signal(self, sig: int) -> None:
        logger.info("signal %s: leaving", signal.Signals(sig).name)
        self.exit_reason = f"signal {signal.Signals(sig).name}"
        self.stop_event.set()

    def stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            logger.info("node %s stopping: %s", self.membership.node_id, reason)
            self.exit_reason = reason
            self.stop_event.set()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        if self.keeper is not None:   # the rounds merged since the last write (a SIGKILL loses at most one)
            with contextlib.suppress(TimeoutError, RuntimeError):
                await asyncio.wait_for(self.keeper.save(), STATE_FLUSH_TIMEOUT_S)
        if self.parts is not None:
            self.parts.stages.stop_watchdog()
            self.parts.bookend.close()
        if self.membership.node_id:
            left = await self.client.leave(self.membership.node_id, self.exit_reason or "shutdown",
                                           metrics=self.metrics(), timeout_s=LEAVE_TIMEOUT_S)
            self.events.write("leave", reason=self.exit_reason, acknowledged=left)
        if self.parts is not None:
            await self.parts.stages.close()
        if self._wire_server is not None:
            await self._wire_server.stop()
        if self._server is not None:
            await self._server.stop(0.5)
        await self.transport.close()
        await self.client.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        self.events.close()

    def _parts(self) -> RunParts:
        assert self.parts is not None, "the node has not joined yet"
        return self.parts

    def _compose(self, reply: pb.JoinReply) -> RunParts:
        """Build the node's parts for the run config the first join reply carries."""
        config = RunConfig.from_json(reply.run_config_json)
        require_backend(config.diloco)
        heartbeat_s = reply.heartbeat_interval_s or config.membership.heartbeat_interval_s
        lease_s = reply.lease_s or config.membership.lease_s
        logger.info("joined as %s, stage %d; run config %s", reply.node_id, reply.stage, config.to_json())
        data_parallel = config.model.stages == 1   # every node is an origin holding the whole model
        schedule = ScheduleKeeper(self.client, self.membership, self.current, self.events, self.stop_event,
                                  heartbeat_s, changed_at=self._started_at)
        resync = OuterResync(self.current, self.membership, self.transport, self.events, data_parallel=data_parallel)
        bookend = BookendCopy(self.current, self.membership, self.transport, self.events,
                              num_stages=config.model.stages,
                              refresh_steps=config.recovery.bookend_copy_every or config.diloco.inner_steps)
        hooks = StageHooks(on_step=self._on_step, on_event=self.events.write, on_failure=self._report_failure,
                           refresh_schedule=schedule.refresh_for_unknown_peer, resync=resync,
                           state_provider=StateSource(self.current, bookend))
        stages = StageAssembler(config, model_config_for(config.model), device=self.device,
                                membership=self.membership, current=self.current, servicer=self.servicer,
                                transport=self.transport, client=self.client, token=self.opts.token,
                                host=self.address.rpartition(":")[0], slowdown=self.opts.slowdown,
                                events=self.events, hooks=hooks, state_dir=self.opts.state_dir)
        origin = OriginLoop(config, data=self.opts.data, membership=self.membership, counters=self.counters,
                            schedule=schedule, events=self.events, lease_s=lease_s,
                            tokenizer=tokenizer_from_join(reply, self.opts.state_dir, has_data=self.opts.has_data))
        standby = StandbyResync(resync, self.membership, schedule.settled, heartbeat_s)
        train = TrainLoop(config, current=self.current, origin=origin, standby=standby, schedule=schedule,
                          counters=self.counters, events=self.events, stop=self.stop, stop_event=self.stop_event,
                          lease_s=lease_s)
        links = None if data_parallel else LinkProber(self.current, self.membership, self.transport, self.client,
                                                      self.stop_event)
        return RunParts(config=config, heartbeat_s=heartbeat_s, lease_s=lease_s, schedule=schedule, stages=stages,
                        bookend=bookend, train=train, links=links)

    # ------------------------------------------------------------------ coordinator

    async def join(self, throughput: float, stage: int) -> pb.JoinReply | None:
        """Register with the coordinator (retrying until it answers or the node stops); None if stopped."""
        if self.opts.state_dir and self.parts is None and self._stored is None:
            self._stored = describe_stored(self.opts.state_dir)   # read once, before the first join
        request = pb.JoinRequest(node_id=self.membership.node_id, address=self.address, device=str(self.device),
                                 memory_bytes=device_memory_bytes(self.device), throughput=throughput,
                                 version=VERSION, stage=stage, has_data=self.opts.has_data,
                                 preferred_stage=self._preferred_stage(), secret=self.secret,
                                 tokenizer_sha256=cached_sha256(self.opts.state_dir) if self.opts.has_data else "")
        if self.parts is None and self._stored is not None:   # a first join: what --state-dir can resume
            request.stored_stages.append(self._stored)
        self._throughput = throughput
        reply = await self._join_as_self(request)
        if reply is None:
            return None
        self.membership.node_id = reply.node_id
        self.servicer.node_id = reply.node_id
        self.membership.epoch = reply.epoch
        self.membership.set_origin(reply.origin_index, reply.num_origins)
        if self.parts is None:
            self.parts = self._compose(reply)
        self.events.context = {"node_id": reply.node_id}
        self.events.write("join", stage=reply.stage, epoch=reply.epoch, instruction=Kind.Name(reply.instruction.kind))
        return reply

    async def _join_as_self(self, request: pb.JoinRequest) -> pb.JoinReply | None:
        """Join, waiting up to ``IDENTITY_WAIT_S`` while a live node holds our id with another identity;
        a join the coordinator refuses for good (the certificate names another node) raises ValueError."""
        deadline = time.monotonic() + IDENTITY_WAIT_S
        backoff = Backoff(1.0, 5.0)
        while True:
            try:
                return await self.client.join(request, stop=self.stop_event)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise ValueError(f"the coordinator refused the join: {exc.details()}") from None
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS or time.monotonic() > deadline:
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                        raise ValueError(f"the coordinator refused the join: {exc.details()}") from None
                    raise
                logger.warning("join refused (%s); waiting for that node's lease to end", exc.details())
            try:
                await asyncio.wait_for(self.stop_event.wait(), backoff.next_delay())
                return None
            except TimeoutError:
                pass

    def _preferred_stage(self) -> int:
        """--preferred-stage, else the stage this node's --state-dir holds (it can resume that one)."""
        if self.opts.preferred_stage >= 0 or self._stored is None:
            return self.opts.preferred_stage
        return self._stored.stage

    async def _after_join(self, reply: pb.JoinReply) -> None:
        """Hold the stage the join reply names (obtaining weights as instructed), then fetch the schedule."""
        instruction = reply.instruction
        agent = self.current.agent
        if instruction.kind in (Kind.RECOVER, Kind.CHANGE_STAGE):
            await self._hold(instruction.stage, instruction.recovery)
        elif agent is None or agent.stage != reply.stage:
            await self._hold(reply.stage, None)
        await self._parts().schedule.reload()

    async def _heartbeat_loop(self) -> None:
        parts = self._parts()
        backoff = Backoff(parts.heartbeat_s, max(parts.heartbeat_s, min(5.0, parts.lease_s)))
        while not self.stop_event.is_set():
            delay = parts.heartbeat_s
            try:
                sent = time.monotonic()
                reply = await self.client.heartbeat(pb.HeartbeatRequest(node_id=self.membership.node_id,
                                                                        metrics=self.metrics(),
                                                                        epoch=self.membership.epoch))
                self._heartbeat_rtt_s = time.monotonic() - sent
                if self.metrics_server is not None:
                    self.metrics_server.heartbeat_latency.observe(self._heartbeat_rtt_s)
                backoff.reset()
                await self._follow(reply)
            except grpc.aio.AioRpcError as exc:
                delay = backoff.next_delay()
                logger.warning("heartbeat failed (%s); next try in %.1f s", exc.code().name, delay)
            self.events.write("metrics", **metrics_record(self.metrics()))
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _follow(self, reply: pb.HeartbeatReply) -> None:
        kind = reply.instruction.kind
        agent = self.current.agent
        if kind == Kind.SHUTDOWN:
            self.stop("coordinator said SHUTDOWN")
        elif kind == Kind.REJOIN:
            logger.info("coordinator does not know this node as live: rejoining")
            rejoined = await self.join(self._throughput, stage=agent.stage if agent is not None else -1)
            if rejoined is not None:
                self._spawn(self._after_join(rejoined))
        elif kind in (Kind.CHANGE_STAGE, Kind.RECOVER):
            plan = reply.instruction.recovery
            if agent is not None and agent.runtime.iteration >= self._parts().config.train.steps:
                self.stop("run finished; not moving to another stage")
            elif plan.plan_id not in self._handled_plans:
                self._handled_plans.add(plan.plan_id)
                self._spawn(self._change_stage(reply.instruction.stage, plan))
        elif kind == Kind.RELOAD_SCHEDULE or reply.epoch != self.membership.epoch:
            await self._parts().schedule.reload()

    def _spawn(self, coro: Any) -> None:
        """Run slow work (stage changes) beside the heartbeat, so the lease never lapses meanwhile."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _change_stage(self, stage: int, plan: pb.RecoveryPlan) -> None:
        await self._hold(stage, plan)
        await self._parts().schedule.reload()

    async def _hold(self, stage: int, plan: pb.RecoveryPlan | None) -> None:
        """Hold ``stage`` (weights per ``plan``) and tell the coordinator how its recovery plan went."""
        parts = self._parts()
        if plan is not None:
            self._handled_plans.add(plan.plan_id)
        ok, message = await parts.stages.hold(stage, plan)
        if plan is not None and plan.plan_id:
            await self.client.report_recovery(self.membership.node_id, plan.plan_id, ok, message)

    async def _report_failure(self, suspect: str, reason: str) -> None:
        self.events.write("failure", suspect=suspect, reason=reason)
        await self.client.report_failure(self.membership.node_id, suspect, reason)

    # ------------------------------------------------------------------ metrics

    def _on_step(self, result: StepResult) -> None:
        self.events.write("step", step=result.iteration + 1, microbatches=result.microbatches,
                          abandoned=result.abandoned, grad_norm=result.grad_norm, lr=result.lr,
                          forced=result.forced, applied=result.applied)
        self._parts().bookend.after_step(result.iteration + 1)

    def metrics(self) -> pb.NodeMetrics:
        metrics = node_metrics(self.counters, self.current, self.transport, self.servicer)
        metrics.heartbeat_rtt_s = self._heartbeat_rtt_s
        # control traffic, counted where it is sent: requests to the coordinator and the peers' small RPCs
        metrics.control_bytes_sent = self.client.bytes_sent + self.transport.control_bytes_sent
        metrics.bytes_sent += self.client.bytes_sent
        return metrics

    def _identity(self) -> tuple[str, int]:
        """The labels of the node's own metrics: its id and the stage it holds (-1: none yet)."""
        agent = self.current.agent
        return self.membership.node_id, agent.stage if agent is not None else -1


def run_node(options: NodeOptions) -> int:
    """Run a node daemon to completion in a fresh event loop (uvloop where available)."""
    install_uvloop()

    async def main() -> int:   # grpc.aio channels must be created inside the running loop
        return await NodeDaemon(options).run()

    return asyncio.run(main())


__all__ = ["NodeDaemon", "NodeOptions", "RunParts", "run_node"]
