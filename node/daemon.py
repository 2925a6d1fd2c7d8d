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
import functools
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from lowband.node.address import advertised_address
from lowband.node.coordinator_client import Backoff, CoordinatorClient
from lowband.node.pipeline.agent import PipelineAgent, Schedule
from lowband.node.pipeline.runtime import StageRuntime, StepResult
from lowband.node.pipeline.transport import LinkTable, Transport
from lowband.node.pipeline.wire import WireServer
from lowband.node.recovery.checkfree import load_rebuilt, rebuild_stage
from lowband.node.service import NodeServicer, StateSnapshot, fetch_state, start_server, start_wire
from lowband.node.sync.outer import OuterSync
from lowband.node.train.data import load_run_corpus, origin_batches, run_val_batches, split_microbatches
from lowband.node.train.model import ModelConfig, build_stage, model_config_for
from lowband.node.train.optim import build_inner_optimizer, lr_at
from lowband.node.train.reference import resolve_device
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.errors import ValidationError
from lowband.protocols.rpc import install_uvloop

logger = logging.getLogger(__name__)

Kind = pb.Instruction.Kind
VERSION = "0.1.0"
LEAVE_TIMEOUT_S = 2.0        # a preempted node has ~seconds; do not wait long for the coordinator
STATE_TIMEOUT_S = 60.0       # copying a stage from a replica (large models take a while)
PING_TIMEOUT_S = 5.0         # asking a peer how far its outer state is
DRAIN_TIMEOUT_S = 5.0        # let the last pushes of the final iteration go out before exiting
ORIGIN_PATIENCE_S = 60.0  # how long stage nodes wait for replacement origins
NO_PIPELINE_FACTOR = 10      # an origin that trained gives up after this many leases without any path
STANDBY_RESYNC_HEARTBEATS = 4  # an idle replica (no visits in the plan) copies the group's θ_global this often
LINK_PROBE_EVERY_S = 10.0    # how often peers are pinged for the planner's link matrix
LINK_PROBE_BYTES = 64 * 1024 # padding of the bandwidth probe
LINK_PROBE_PEERS = 32        # at most this many peers per report (the closest stages first)


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
    wire: bool = True             # activation wire beside gRPC (node/pipeline/wire.py); False: gRPC pipes only
    wire_port: int = 0            # the wire's TCP port on the listen host (0: any free port)


class EventLog:
    """JSON lines of events and metrics (the simulator reads them); each record names node, stage, step."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1) if path else None
        self.context: dict[str, Any] = {}

    def write(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"time": time.time(), "kind": kind, **self.context, **fields}
        self._file.write(json.dumps(record, default=str) + "\n")

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def measure_throughput(device: torch.device, slowdown: float = 1.0, reps: int = 3) -> float:
    """Samples/s of forward+backward through one tiny block: a relative speed for stage assignment."""
    cfg = ModelConfig.from_preset("tiny")
    stage = build_stage(cfg, 1, cfg.n_layers + 1, seed=0).to(device)   # one block per stage
    x = torch.randn(4, 64, cfg.dim, device=device)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-6)   # warms up torch.optim's lazy imports too
    stage(x).sum().backward()
    optimizer.step()
    start = time.perf_counter()
    for _ in range(reps):
        stage(x).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * slowdown
    return max(1e-3, reps * x.shape[0] / elapsed)


class NodeDaemon:
    """One node process. ``await NodeDaemon(options).run()`` returns the exit code."""

    def __init__(self, options: NodeOptions) -> None:
        self.opts = options
        self.device = resolve_device(options.device)
        self.node_id = options.node_id
        self.config: RunConfig | None = None
        self.model_cfg: ModelConfig | None = None
        self.agent: PipelineAgent | None = None
        self.epoch = 0
        self.origin_index = -1
        self.num_origins = 0
        self.events = EventLog(options.log_json)
        self.links = LinkTable(options.links_file) if options.links_file else None
        self.transport = Transport(options.token, links=self.links, wire=options.wire)
        self.servicer = NodeServicer(options.node_id)
        self.client = CoordinatorClient(options.coordinator, options.token)
        self.stop_event = asyncio.Event()
        self.exit_reason = ""
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._wire_server: WireServer | None = None
        self._stage_lock = asyncio.Lock()
        self._schedule_lock = asyncio.Lock()
        self._schedule_changed = asyncio.Event()
        self._handled_plans: set[int] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._watchdog: asyncio.Task[None] | None = None
        self.outer: OuterSync | None = None
        self._bookend: dict[str, torch.Tensor] | None = None   # stages 1 and S-1: copy of stage 0
        self._bookend_task: asyncio.Task[None] | None = None
        # metrics
        self.loss = math.nan
        self.val_loss = math.nan
        self.tokens = 0
        self.train_started = 0.0
        self._batches: Any = None
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._no_origin_since: float | None = None
        self._no_paths_since: float | None = None
        self._last_refresh = 0.0
        self._schedule_changed_at = time.monotonic()
        self._last_standby_resync = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        torch.set_num_threads(max(1, self.opts.torch_threads))
        try:
            self._server, port = await start_server(self.servicer, self.opts.listen, self.opts.token)
            if self.opts.wire:
                self._wire_server = await start_wire(self.servicer, self.opts.listen.rpartition(":")[0],
                                                     self.opts.token, self.opts.wire_port)
            self.address = advertised_address(self.opts.listen, port, self.opts.advertise, self.opts.coordinator)
            self.events.write("start", address=self.address, pid=os.getpid(), device=str(self.device))
            throughput = await asyncio.to_thread(measure_throughput, self.device, self.opts.slowdown)
            logger.info("node listening on %s; throughput %.1f samples/s", self.address, throughput)
            reply = await self._join(throughput, stage=-1)
            if reply is None:
                return 0
            # Heartbeats first: building the stage may take a while and the lease is short.
            self._tasks = [asyncio.create_task(self._heartbeat_loop(), name="heartbeat")]
            await self._after_join(reply)
            self._tasks.append(asyncio.create_task(self._train_loop(), name="train"))
            self._tasks.append(asyncio.create_task(self._link_loop(), name="links"))
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
            logger.info("node %s stopping: %s", self.node_id, reason)
            self.exit_reason = reason
            self.stop_event.set()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
        for extra in (self._watchdog, self._bookend_task):
            if extra is not None:
                extra.cancel()
        if self.node_id:
            left = await self.client.leave(self.node_id, self.exit_reason or "shutdown", metrics=self.metrics(),
                                           timeout_s=LEAVE_TIMEOUT_S)
            self.events.write("leave", reason=self.exit_reason, acknowledged=left)
        if self.outer is not None:   # first: releases a worker thread waiting for an outer round
            await self.outer.close()
        if self.agent is not None:
            await self.agent.close()
            self.agent.runtime.shutdown()
        if self._wire_server is not None:
            await self._wire_server.stop()
        if self._server is not None:
            await self._server.stop(0.5)
        await self.transport.close()
        await self.client.close()
        self.events.close()

    # ------------------------------------------------------------------ coordinator

    async def _join(self, throughput: float, stage: int) -> pb.JoinReply | None:
        request = pb.JoinRequest(node_id=self.node_id, address=self.address, device=str(self.device),
                                 memory_bytes=0, throughput=throughput, version=VERSION, stage=stage,
                                 has_data=self.opts.has_data, preferred_stage=self.opts.preferred_stage)
        self._throughput = throughput
        reply = await self.client.join(request, stop=self.stop_event)
        if reply is None:
            return None
        self.node_id = reply.node_id
        self.servicer.node_id = reply.node_id
        self.epoch = reply.epoch
        self.origin_index, self.num_origins = reply.origin_index, reply.num_origins
        if self.config is None:
            config = RunConfig.from_json(reply.run_config_json)
            self.config = config
            self.model_cfg = model_config_for(config.model)
            self.heartbeat_s = reply.heartbeat_interval_s or config.membership.heartbeat_interval_s
            self.lease_s = reply.lease_s or config.membership.lease_s
            logger.info("joined as %s, stage %d; run config %s", reply.node_id, reply.stage, config.to_json())
        self.events.context = {"node_id": self.node_id}
        self.events.write("join", stage=reply.stage, epoch=reply.epoch, instruction=Kind.Name(reply.instruction.kind))
        return reply

    async def _after_join(self, reply: pb.JoinReply) -> None:
        """Hold the stage the join reply names (obtaining weights as instructed), then fetch the schedule."""
        instruction = reply.instruction
        if instruction.kind in (Kind.RECOVER, Kind.CHANGE_STAGE):
            await self._hold(instruction.stage, instruction.recovery)
        elif self.agent is None or self.agent.stage != reply.stage:
            await self._hold(reply.stage, None)
        await self._reload_schedule()

    async def _heartbeat_loop(self) -> None:
        assert self.config is not None
        backoff = Backoff(self.heartbeat_s, max(self.heartbeat_s, min(5.0, self.lease_s)))
        while not self.stop_event.is_set():
            delay = self.heartbeat_s
            try:
                reply = await self.client.heartbeat(pb.HeartbeatRequest(node_id=self.node_id, metrics=self.metrics(),
                                                                        epoch=self.epoch))
                backoff.reset()
                await self._follow(reply)
            except grpc.aio.AioRpcError as exc:
                delay = backoff.next_delay()
                logger.warning("heartbeat failed (%s); next try in %.1f s", exc.code().name, delay)
            self.events.write("metrics", **self.metrics_dict())
            try:
                await asyncio.wait_for(self.stop_event.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _follow(self, reply: pb.HeartbeatReply) -> None:
        kind = reply.instruction.kind
        if kind == Kind.SHUTDOWN:
            self.stop("coordinator said SHUTDOWN")
        elif kind == Kind.REJOIN:
            logger.info("coordinator does not know this node as live: rejoining")
            stage = self.agent.stage if self.agent is not None else -1
            rejoined = await self._join(self._throughput, stage=stage)
            if rejoined is not None:
                self._spawn(self._after_join(rejoined))
        elif kind in (Kind.CHANGE_STAGE, Kind.RECOVER):
            plan = reply.instruction.recovery
            assert self.config is not None
            if self.agent is not None and self.agent.runtime.iteration >= self.config.train.steps:
                self.stop("run finished; not moving to another stage")
            elif plan.plan_id not in self._handled_plans:
                self._handled_plans.add(plan.plan_id)
                self._spawn(self._change_stage(reply.instruction.stage, plan))
        elif kind == Kind.RELOAD_SCHEDULE or reply.epoch != self.epoch:
            await self._reload_schedule()

    def _spawn(self, coro: Any) -> None:
        """Run slow work (stage changes) beside the heartbeat, so the lease never lapses meanwhile."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _change_stage(self, stage: int, plan: pb.RecoveryPlan) -> None:
        await self._hold(stage, plan)
        await self._reload_schedule()

    async def _refresh_for_unknown_peer(self) -> None:
        """A microbatch names a node we do not know yet: our schedule is older than the sender's. Many
        microbatches at once share one reload: one that arrives while a reload is under way waits for it
        (returning at once would leave it without the address, and a node that just moved stages, with
        no schedule yet, would give up its microbatches without even telling their origins)."""
        asked_at = time.monotonic()
        async with self._schedule_lock:
            if self._last_refresh >= asked_at - 0.2:   # one finished just now, or while we waited
                return
        await self._reload_schedule()

    async def _reload_schedule(self) -> None:
        async with self._schedule_lock:
            try:
                reply = await self.client.schedule(self.node_id, stop=self.stop_event)
            except grpc.aio.AioRpcError as exc:
                logger.warning("schedule refused (%s): %s", exc.code().name, exc.details())
                return
            finally:
                self._last_refresh = time.monotonic()
            if reply is None:
                return
            schedule = Schedule.from_reply(reply)
            if reply.epoch != self.epoch:
                self._schedule_changed_at = time.monotonic()
            self.epoch = reply.epoch
            if reply.num_origins:
                self.origin_index, self.num_origins = reply.origin_index, reply.num_origins
            if self.agent is not None:
                self.agent.set_schedule(schedule)
            self.events.write("schedule", epoch=reply.epoch, paths=len(schedule.paths),
                              expected=schedule.expected(self.agent is not None and self.agent.is_origin),
                              peers=len(schedule.addresses))
            self._schedule_changed.set()

    @staticmethod
    async def _watch(runtime: StageRuntime, agent: PipelineAgent) -> None:
        """Keep a stalled iteration from waiting longer than it must: the runtime closes one that made no
        progress for its timeout; before that, the agent asks the origins whether more of it is coming."""
        await asyncio.gather(runtime.watchdog(), agent.ask_origins())

    async def _report_failure(self, suspect: str, reason: str) -> None:
        self.events.write("failure", suspect=suspect, reason=reason)
        await self.client.report_failure(self.node_id, suspect, reason)

    # ------------------------------------------------------------------ holding a stage

    async def _hold(self, stage: int, plan: pb.RecoveryPlan | None) -> None:
        """Build stage ``stage``, obtain its weights per ``plan`` and start serving it."""
        assert self.config is not None and self.model_cfg is not None
        async with self._stage_lock:
            config, cfg = self.config, self.model_cfg
            method = plan.method if plan is not None and plan.method else "fresh"
            if plan is not None:
                self._handled_plans.add(plan.plan_id)
            old = self.agent
            previous_iteration = old.runtime.iteration if old is not None else 0
            self.servicer.detach()
            if old is not None:
                self.agent = None
                await old.close()
                old.runtime.shutdown()
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self.outer is not None:
                await self.outer.close()
                self.outer = None
            module = await asyncio.to_thread(build_stage, cfg, stage, config.model.stages, config.seed)
            iteration, lr_scale, ok, message = 0, 1.0, True, ""
            outer_parts: dict[str, dict[str, torch.Tensor]] = {}
            if method != "fresh":
                try:
                    iteration, lr_scale, outer_parts = await self._obtain(module, stage, method, plan)
                except (grpc.aio.AioRpcError, ValidationError, ValueError) as exc:
                    ok = False
                    message = f"{method} failed: {exc}"
                    logger.error("stage %d: %s; keeping fresh weights", stage, message)
            # θ_global: the copied replica's, else the weights we start from (equal across fresh replicas;
            # a rebuilt stage enters its next outer sync with the rebuilt weights).
            module = module.to(self.device)
            outer = OuterSync(module, stage, self.node_id, config, self.client, self.opts.token,
                              on_event=self._agent_event, resync=self._resync_outer,
                              host=self.address.rpartition(":")[0])
            if outer_parts:
                try:
                    outer.load_parts(outer_parts)
                except ValueError as exc:
                    logger.warning("stage %d: replica's DiLoCo state unusable (%s); starting from local", stage, exc)
            # A moved node keeps the run's iteration even when the copy failed (and adopts the
            # iteration of its first microbatch anyway).
            iteration = max(iteration, previous_iteration)
            optimizer = await asyncio.to_thread(build_inner_optimizer, module.parameters(), config.train, lr_scale)
            train = config.train
            runtime = StageRuntime(module, stage, optimizer, grad_clip=train.grad_clip,
                                   lr_fn=lambda it: lr_at(it, train), iteration=iteration,
                                   iteration_timeout_s=3 * train.hop_timeout_s, slowdown=self.opts.slowdown,
                                   on_step=self._on_step, device=self.device, after_step=outer.after_step)
            runtime.adopt_next_iteration = method != "fresh" or previous_iteration > 0
            agent = PipelineAgent(self.node_id, config.run_id, runtime, self.transport, dim=cfg.dim,
                                  max_seq_len=cfg.max_seq_len, codec=train.activation_codec,
                                  hop_timeout_s=train.hop_timeout_s, num_stages=config.model.stages,
                                  on_failure=self._report_failure,
                                  on_event=self._agent_event, refresh_schedule=self._refresh_for_unknown_peer)
            self.agent = agent
            self._last_refresh = 0.0   # a schedule fetched for the previous agent never reached this one
            self.outer = outer
            self.servicer.attach(stage=stage, agent=agent, state_provider=self._state,
                                 shard_reducer=outer.reducer, outer_steps=outer.total_outer_steps)
            self._watchdog = asyncio.create_task(self._watch(runtime, agent), name="watchdog")
            self.events.context = {"node_id": self.node_id, "stage": stage}
            self.events.write("stage", method=method, iteration=iteration, ok=ok, message=message)
            logger.info("node %s holds stage %d (%s, iteration %d)", self.node_id, stage, method, iteration)
        if plan is not None and plan.plan_id:
            await self.client.report_recovery(self.node_id, plan.plan_id, ok, message)

    async def _obtain(self, module: torch.nn.Module, stage: int, method: str, plan: pb.RecoveryPlan
                      ) -> tuple[int, float, dict[str, dict[str, torch.Tensor]]]:
        """Fetch the plan's sources over GetState and load the result.

        Returns (iteration, lr scale, the source's DiLoCo parts for a replica copy).
        """
        part = "bookend" if method == "bookend-copy" else "local"
        parts = [part, "global", "outer"] if method == "replica-copy" else [part]
        states: dict[int, dict[str, torch.Tensor]] = {}
        weights: dict[int, float] = {}
        iteration = 0
        outer_parts: dict[str, dict[str, torch.Tensor]] = {}
        for i, source in enumerate(plan.sources):
            snapshot = await fetch_state(self.transport.stub(source.address), source.stage, parts, self.node_id,
                                         metadata=self.transport.metadata, timeout_s=STATE_TIMEOUT_S)
            outer_parts = {k: v for k, v in snapshot.parts.items() if k in ("global", "outer")}
            if part not in snapshot.parts:
                raise ValidationError(f"source {source.node_id} sent no {part!r} state")
            states[source.stage] = snapshot.parts[part]
            weights[source.stage] = plan.weights[i] if i < len(plan.weights) else 1.0
            iteration = max(iteration, snapshot.inner_step)
        if method == "replica-copy":
            if not states:
                raise ValidationError("replica-copy plan names no source")
            state = next(iter(states.values()))
            lr_scale = 1.0
        else:
            # random-reinit keeps the module's own fresh initialisation.
            state = rebuild_stage(method, states, weights, fresh_state=module.state_dict())
            lr_scale = plan.lr_scale or self.config.recovery.lr_scale  # type: ignore[union-attr]
        load_rebuilt(module, state)
        return iteration, lr_scale, outer_parts if method == "replica-copy" else {}

    async def _resync_outer(self, *, standby: bool = False) -> None:
        """This replica missed outer rounds: adopt θ_global and the outer state of the replica of our
        stage that is furthest ahead (it contributes again from its next round). A ``standby`` replica
        (one the plan leaves idle) also takes θ_global as its local weights: it has trained nothing since.
        A training replica adopts only the fragments where the source is ahead (``OuterSync.load_parts``):
        it can be behind in the fragment whose round it missed while level or ahead in total, so it asks
        its peers in turn, not only those ahead in total."""
        agent, outer = self.agent, self.outer
        if agent is None or outer is None:
            return
        # Ask first (a Ping: a few bytes), copy second (θ_global and the outer state: twice the stage's
        # size), from the replica furthest ahead first: a standby asks every few heartbeats.
        ahead: list[tuple[int, str, str]] = []
        peers = sorted(n for n, s in agent.schedule.stages.items() if s == agent.stage and n != self.node_id)
        for node_id in peers[:3]:
            address = agent.schedule.addresses.get(node_id)
            if address is None:
                continue
            try:
                _, pong = await self.transport.ping(address, timeout_s=PING_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                continue
            if pong.stage == agent.stage and (pong.outer_steps > outer.total_outer_steps() or not standby):
                ahead.append((pong.outer_steps, node_id, address))
        for _, node_id, address in sorted(ahead, reverse=True):
            try:
                snapshot = await fetch_state(self.transport.stub(address), agent.stage, ["global", "outer"],
                                             self.node_id, metadata=self.transport.metadata,
                                             timeout_s=STATE_TIMEOUT_S)
            except (grpc.aio.AioRpcError, ValidationError) as exc:
                logger.info("outer state from %s unavailable: %s", node_id, exc)
                continue
            steps_t = snapshot.parts.get("outer", {}).get("steps")
            steps = int(steps_t.sum()) if steps_t is not None else 0
            if standby and steps <= outer.total_outer_steps():
                return
            # Data-parallel mode: no pipeline keeps the replicas at one inner step, so one that missed a
            # round may be many steps behind: it also jumps to the source's step (skipping that data).
            open_at = snapshot.inner_step if self._data_parallel() and not standby else None
            try:
                adopted = await agent.runtime.run(functools.partial(outer.load_parts, reset_local=standby,
                                                                    catch_up=not standby, open_at=open_at),
                                                  snapshot.parts, slow=False)
            except ValueError as exc:
                logger.warning("outer state from %s unusable: %s", node_id, exc)
                continue
            if open_at is not None:
                # never further than the source: a replica ahead of its group would open rounds alone
                agent.note_open_iteration(open_at)
            elif not adopted:
                continue   # not ahead in any fragment: ask the next replica
            self.events.write("standby-resync" if standby else "outer-resync", source=node_id, outer_steps=steps,
                              fragments=adopted, inner_step=snapshot.inner_step)
            return

    def _data_parallel(self) -> bool:
        """``model.stages = 1``: every node is an origin holding the whole model; paths are the origins."""
        return self.config is not None and self.config.model.stages == 1

    def _standby(self, agent: PipelineAgent) -> bool:
        """The settled plan routes no microbatch through this replica (the planner left it out: too slow
        or too far) while another replica of its stage works: it takes no inner steps and joins no
        sync round, so it follows the group instead (``_train_loop``)."""
        return (not agent.is_origin and not agent.schedule.visits and self._settled_schedule()
                and any(s == agent.stage and n != self.node_id for n, s in agent.schedule.stages.items()))

    def _settled_schedule(self) -> bool:
        return time.monotonic() - self._schedule_changed_at > 2 * self.heartbeat_s

    async def _state(self, stage: int, parts: list[str]) -> StateSnapshot:
        agent = self.agent
        if agent is None or agent.stage != stage:
            raise ValidationError(f"this node does not hold stage {stage}")
        snapshot = StateSnapshot(inner_step=agent.runtime.iteration, grad_norm=agent.runtime.last_grad_norm)
        outer = self.outer
        for part in parts:
            if part == "local":
                snapshot.parts["local"] = await agent.runtime.state()
            elif part == "bookend" and self._bookend is not None:
                snapshot.parts["bookend"] = self._bookend
            elif part in ("global", "outer") and outer is not None:
                if part not in snapshot.parts:
                    outer_parts, step = await agent.runtime.run(outer.state_at, slow=False)
                    snapshot.parts.update(outer_parts)
                    snapshot.inner_step = max(snapshot.inner_step, step)
            else:
                raise ValidationError(f"state part {part!r} is not available on this node")
        snapshot.parts = {k: v for k, v in snapshot.parts.items() if k in parts}
        snapshot.outer_step = outer.outer_steps if outer is not None else 0
        return snapshot

    # ------------------------------------------------------------------ training

    def _on_step(self, result: StepResult) -> None:
        self.events.write("step", step=result.iteration + 1, microbatches=result.microbatches,
                          abandoned=result.abandoned, grad_norm=result.grad_norm, lr=result.lr,
                          forced=result.forced, applied=result.applied)
        assert self.config is not None
        agent = self.agent
        step = result.iteration + 1
        # stages 1 and S-1 keep the copy; stage 0 never copies itself (with S = 1, S-1 is stage 0)
        holder = agent is not None and agent.stage != 0 and agent.stage in (1, self.config.model.stages - 1)
        due = self._bookend is None or step % self.config.diloco.inner_steps == 0
        if holder and due and (self._bookend_task is None or self._bookend_task.done()):
            self._bookend_task = asyncio.create_task(self._refresh_bookend())

    async def _refresh_bookend(self) -> None:
        """CheckFree+: stages 1 and S-1 keep a copy of stage 0 (small), refreshed every outer period,
        so even losing every origin is recoverable (``bookend-copy``)."""
        agent = self.agent
        if agent is None:
            return
        origins = sorted(n for n, s in agent.schedule.stages.items() if s == 0)
        for node_id in origins:
            address = agent.schedule.addresses.get(node_id)
            if address is None:
                continue
            try:
                snapshot = await fetch_state(self.transport.stub(address), 0, ["local"], self.node_id,
                                             metadata=self.transport.metadata, timeout_s=STATE_TIMEOUT_S)
            except (grpc.aio.AioRpcError, ValidationError) as exc:
                logger.info("bookend copy from %s failed: %s", node_id, exc)
                continue
            if "local" in snapshot.parts:
                self._bookend = snapshot.parts["local"]
                self.events.write("bookend-copy", source=node_id, step=snapshot.inner_step)
                return

    async def _link_loop(self) -> None:
        """Ping peers (a small and a padded probe) and report RTT and bandwidth for the path planner."""
        if self._data_parallel():
            return   # a path is just its origin: the planner reads no links
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=LINK_PROBE_EVERY_S)
            agent = self.agent
            if agent is None or self.stop_event.is_set():
                continue
            mine = agent.stage
            peers = sorted((abs(s - mine), n) for n, s in agent.schedule.stages.items() if n != self.node_id)
            report = pb.LinkReport(node_id=self.node_id)
            for _, node_id in peers[:LINK_PROBE_PEERS]:
                address = agent.schedule.addresses[node_id]
                try:
                    rtt, _ = await self.transport.ping(address, timeout_s=5.0)
                    big, _ = await self.transport.ping(address, timeout_s=5.0, padding=LINK_PROBE_BYTES)
                except grpc.aio.AioRpcError:
                    continue
                bandwidth = LINK_PROBE_BYTES / max(big - rtt, 1e-6)
                report.links.add(peer_id=node_id, rtt_s=rtt, bandwidth_bytes_per_s=bandwidth)
            if report.links:
                await self.client.report_links(report)

    def _agent_event(self, kind: str, **fields: Any) -> None:
        self.events.write(kind, **fields)

    async def _train_loop(self) -> None:
        assert self.config is not None
        steps = self.config.train.steps
        while not self.stop_event.is_set():
            agent = self.agent
            if agent is None:
                await asyncio.sleep(0.1)
                continue
            if agent.runtime.iteration >= steps:
                if agent.is_origin:
                    await self._evaluate(agent, agent.runtime.iteration)
                else:   # serve the origins' final evaluation until they leave
                    await self._linger(agent)
                await self._drain(agent)
                await self._final_record(agent)
                self.stop(f"finished {steps} iterations")
                return
            if agent.is_origin:
                if not agent.schedule.paths or not self._settled():
                    if self._no_pipeline_too_long(agent):
                        await self._evaluate(agent, agent.runtime.iteration)
                        self.stop(f"no complete pipeline for {NO_PIPELINE_FACTOR * self.lease_s:g} s")
                        return
                    await self._wait_schedule(0.5)
                    continue
                self._no_paths_since = None
                await self._origin_iteration(agent)
            else:
                if self._origins_gone(agent):
                    await self._drain(agent)
                    self.stop("no origin left in the run")
                    return
                if self._standby(agent) and time.monotonic() - self._last_standby_resync > self._standby_every_s():
                    # keep θ_global current, so that a new plan or a CheckFree recovery that puts this
                    # replica back to work (or copies from it) starts from the group's weights
                    self._last_standby_resync = time.monotonic()
                    await self._resync_outer(standby=True)
                await asyncio.sleep(0.2)

    async def _final_record(self, agent: PipelineAgent) -> None:
        """``final``: each fragment's outer step and a digest of its θ_global, so a run's log shows whether
        the replicas of a stage ended in agreement (equal outer steps must mean equal digests). Once per
        run, and only when events are logged: it reads every weight of the stage."""
        outer = self.outer
        if outer is None or not self.events.enabled:
            return
        digests = await agent.runtime.run(outer.diloco.global_digests, slow=False)
        self.events.write("final", step=agent.runtime.iteration, outer_steps=dict(outer.diloco.outer.steps),
                          global_digest=digests)

    def _no_pipeline_too_long(self, agent: PipelineAgent) -> bool:
        """An origin that trained but has had no path for many leases gives up (the run is over or
        a stage is lost for good): waiting is bounded like every other wait."""
        if self._batches is None or agent.schedule.paths:
            return False
        now = time.monotonic()
        if self._no_paths_since is None:
            self._no_paths_since = now
        return now - self._no_paths_since > NO_PIPELINE_FACTOR * self.lease_s

    def _settled(self) -> bool:
        """Before its first iteration an origin waits until membership has not changed for two
        heartbeats, so the nodes joining at the start of a run all hold the same schedule."""
        return self._batches is not None or self._settled_schedule()

    def _standby_every_s(self) -> float:
        """How often an idle replica copies the group's state: a few heartbeats (a state fetch is one
        GetState call; outer rounds come every H inner steps, far less often)."""
        return STANDBY_RESYNC_HEARTBEATS * self.heartbeat_s

    def _origins_gone(self, agent: PipelineAgent) -> bool:
        """A stage node with no origin in its schedule for a long while after training began is done.

        Losing every origin is recoverable (replacements rebuild stage 0 from the bookend copies
        this node keeps), so the patience is long; the normal end of a run is the coordinator's
        SHUTDOWN, not this.
        """
        has_origin = any(s == 0 for s in agent.schedule.stages.values())
        if has_origin or (self.train_started == 0.0 and agent.runtime.iteration == 0):
            self._no_origin_since = None
            return False
        now = time.monotonic()
        if self._no_origin_since is None:
            self._no_origin_since = now
        return now - self._no_origin_since > max(ORIGIN_PATIENCE_S, 20 * self.lease_s)

    async def _linger(self, agent: PipelineAgent) -> None:
        """Wait (bounded) until no origin is left in the schedule."""
        assert self.config is not None
        # A lagging origin finishes quickly: its microbatches are refused as stale and it catches up.
        deadline = time.monotonic() + max(NO_PIPELINE_FACTOR * self.lease_s, 2 * self.config.train.hop_timeout_s)
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if not any(s == 0 for s in agent.schedule.stages.values()):
                return
            await self._wait_schedule(0.5)

    async def _wait_schedule(self, timeout_s: float) -> None:
        self._schedule_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._schedule_changed.wait(), timeout=timeout_s)

    async def _drain(self, agent: PipelineAgent) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while agent._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _data(self) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        assert self.config is not None
        config = self.config
        if self.opts.data:
            config = apply_overrides(config, [f"train.data={self.opts.data}"])
        corpus = load_run_corpus(config)
        index, count = max(0, self.origin_index), max(1, self.num_origins)
        batches = origin_batches(config, corpus, index, count)
        val = []
        for x, y in run_val_batches(config, corpus):
            val.extend(split_microbatches(x, y, config.train.microbatch_size))
        return batches, val

    async def _origin_iteration(self, agent: PipelineAgent) -> None:
        assert self.config is not None
        train = self.config.train
        if self._batches is None:
            self._batches, self._val = await asyncio.to_thread(self._data)
            for _ in range(agent.runtime.iteration):   # a late origin resumes the data order where the run is
                next(self._batches)
            self.train_started = time.monotonic()
            self._tokens_at_start = self.tokens
            await self._evaluate(agent, agent.runtime.iteration)
        if agent.catch_up_to > agent.runtime.iteration:   # we fell behind the run (late joiner)
            skip = agent.catch_up_to - agent.runtime.iteration
            logger.info("origin %s catches up %d iterations to %d", self.node_id, skip, agent.catch_up_to)
            agent.runtime.jump_to(agent.catch_up_to)
            for _ in range(skip):
                next(self._batches)
        iteration = agent.runtime.iteration
        if iteration >= train.steps:
            return
        x, y = next(self._batches)
        microbatches = split_microbatches(x, y, train.microbatch_size)
        result = await agent.run_iteration(iteration, microbatches)
        self.tokens += result.tokens
        if result.losses:
            self.loss = result.loss
        self.events.write("iteration", step=iteration + 1, loss=result.loss if result.losses else None,
                          abandoned=result.abandoned, tokens=self.tokens, seconds=result.seconds)
        done = iteration + 1
        if done % train.eval_every == 0 and done < train.steps:
            await self._evaluate(agent, done)
        if not result.losses:
            # Every microbatch failed (a hop is down): do not race through iterations without training,
            # dragging the stages along; wait for the coordinator's next schedule (bounded).
            await self._wait_schedule(self.lease_s)

    async def _evaluate(self, agent: PipelineAgent, iteration: int) -> None:
        if not self._val or not agent.schedule.paths:
            return
        value = await agent.evaluate(iteration, self._val)
        if math.isfinite(value):
            self.val_loss = value
        self.events.write("eval", step=iteration, val_loss=value)
        logger.info("node %s step %d: val loss %.4f", self.node_id, iteration, value)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> pb.NodeMetrics:
        agent = self.agent
        elapsed = time.monotonic() - self.train_started if self.train_started else 0.0
        tokens = self.tokens - getattr(self, "_tokens_at_start", 0)
        return pb.NodeMetrics(
            step=agent.runtime.iteration if agent else 0,
            loss=self.loss if math.isfinite(self.loss) else 0.0,
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
            bytes_sent=self.transport.bytes_sent + self.servicer.state_bytes_sent + (
                self.outer.wire_bytes_sent if self.outer else 0),
            bytes_received=self.servicer.bytes_received,
            grad_norm=agent.runtime.last_grad_norm if agent else 0.0,
            activation_bytes_sent=self.transport.activation_bytes_sent,
            outer_step=self.outer.outer_steps if self.outer is not None else 0,
            sync_bytes_sent=self.outer.wire_bytes_sent if self.outer else 0,
            val_loss=self.val_loss if math.isfinite(self.val_loss) else 0.0,
            tokens=self.tokens,
            state_bytes_sent=self.servicer.state_bytes_sent,
        )

    def metrics_dict(self) -> dict[str, Any]:
        m = self.metrics()
        return {"step": m.step, "loss": m.loss, "tokens_per_s": m.tokens_per_s, "bytes_sent": m.bytes_sent,
                "bytes_received": m.bytes_received, "grad_norm": m.grad_norm,
                "activation_bytes_sent": m.activation_bytes_sent, "val_loss": m.val_loss, "tokens": m.tokens,
                "outer_step": m.outer_step, "sync_bytes_sent": m.sync_bytes_sent,
                "state_bytes_sent": m.state_bytes_sent}


def run_node(options: NodeOptions) -> int:
    """Run a node daemon to completion in a fresh event loop (uvloop where available)."""
    install_uvloop()

    async def main() -> int:   # grpc.aio channels must be created inside the running loop
        return await NodeDaemon(options).run()

    return asyncio.run(main())


__all__ = ["EventLog", "NodeDaemon", "NodeOptions", "measure_throughput", "run_node"]
