"""Holding a stage: build it, obtain its weights as the coordinator's plan says, wire it up and serve it.

A stage is a ``StageRuntime`` (module, inner optimizer, worker thread), its ``OuterSync`` (Streaming
DiLoCo among the stage's replicas) and the ``PipelineAgent`` that routes microbatches through it.
Weights come ``fresh`` from the run seed (so all replicas start equal), as a ``replica-copy`` of a
live replica, or from a CheckFree rebuild (node/recovery/obtain.py); a node with a ``--state-dir``
holding this run's state of the stage resumes from it (``local-state``) unless a live replica has
the stage. Changing stage tears the old one down first; the servicer answers "no stage" meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import torch

from lowband.node.coordinator_client import CoordinatorClient
from lowband.node.event_log import EventLog
from lowband.node.membership import Membership
from lowband.node.pipeline.agent import PipelineAgent
from lowband.node.pipeline.runtime import StageRuntime, StepResult
from lowband.node.pipeline.transport import Transport
from lowband.node.recovery.local_state import StageState, resumable_state
from lowband.node.recovery.obtain import obtain_weights
from lowband.node.service import NodeServicer, StateProvider
from lowband.node.sync.outer import OuterSync
from lowband.node.train.model import ModelConfig, build_stage, subspace_basis
from lowband.node.train.optim import build_inner_optimizer, lr_at
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig
from lowband.protocols.errors import ValidationError
from lowband.protocols.stored_stage import LOCAL_STATE

logger = logging.getLogger(__name__)



@dataclass(slots=True)
class CurrentStage:
    """The stage this node serves now (None before the first, and while it changes stage).

    Only ``StageAssembler`` writes it; the loops, probes and recovery steps read it each time they
    act, so none of them holds on to a stage the node has left.
    """

    agent: PipelineAgent | None = None
    outer: OuterSync | None = None


@dataclass(frozen=True, slots=True)
class StageHooks:
    """What a new stage reports to and asks of the rest of the node."""

    on_step: Callable[[StepResult], None]                 # after every inner step (worker thread's result)
    on_event: Callable[..., None]                         # agent and DiLoCo events for the event log
    on_failure: Callable[[str, str], Awaitable[None]]     # (suspect, reason): a hop failed
    refresh_schedule: Callable[[], Awaitable[None]]       # a microbatch named a peer we do not know
    resync: Callable[[], Awaitable[None]]                 # DiLoCo: this replica missed outer rounds
    state_provider: StateProvider                         # GetState: what this node serves to recovering peers


class StageAssembler:
    """Builds, replaces and tears down the stage in ``current``; one change at a time."""

    def __init__(self, config: RunConfig, model_cfg: ModelConfig, *, device: torch.device, membership: Membership,
                 current: CurrentStage, servicer: NodeServicer, transport: Transport, client: CoordinatorClient,
                 token: str, host: str, slowdown: float, events: EventLog, hooks: StageHooks,
                 state_dir: str = "") -> None:
        self.config = config
        self.model_cfg = model_cfg
        self.device = device
        self.membership = membership
        self.current = current
        self.servicer = servicer
        self.transport = transport
        self.client = client
        self.token = token
        self.host = host   # the host peers reach this node at (OuterSync's backend binds there)
        self.slowdown = slowdown
        self.events = events
        self.hooks = hooks
        self._lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self.state_dir = state_dir   # --state-dir: resume a stage from there when no live replica has it
        self._first_hold = True

    async def hold(self, stage: int, plan: pb.RecoveryPlan | None) -> tuple[bool, str]:
        """Build stage ``stage``, obtain its weights per ``plan`` and start serving it.

        Returns (ok, message): a failed copy or rebuild keeps fresh weights and says why.
        """
        async with self._lock:
            config, cfg, node_id = self.config, self.model_cfg, self.membership.node_id
            method = plan.method if plan is not None and plan.method else "fresh"
            old = self.current.agent
            previous_iteration = old.runtime.iteration if old is not None else 0
            await self._release()
            module = await asyncio.to_thread(build_stage, cfg, stage, config.model.stages, config.seed)
            iteration, lr_scale, ok, message = 0, 1.0, True, ""
            outer_parts: dict[str, dict[str, torch.Tensor]] = {}
            # Only when this process first takes a stage (a restart): later, the file holds what this node
            # has trained since, and a live replica's copy is newer than ours whenever there is one. Not
            # when the coordinator plans fresh weights either: that is a new run (its run directory knows
            # of no training), which must not silently continue an old one's weights.
            stored = None
            if self._first_hold and method != "fresh":
                stored = self._stored(stage)
            elif self._first_hold and method == "fresh" and self.state_dir:
                logger.info("a new run (fresh weights planned): the state in %s is not resumed", self.state_dir)
            self._first_hold = False
            # A live replica's copy is at least as new as our file; anything else the coordinator plans is
            # a rebuild our own state makes unnecessary.
            resumed = self._resume(module, stage, stored, plan) if method != "replica-copy" else None
            if resumed is not None:
                iteration, outer_parts, method, message = resumed
            elif method == LOCAL_STATE:
                # the coordinator planned on the state this node said it holds; it cannot be used after all
                ok, message = False, f"no usable state of stage {stage} in --state-dir {self.state_dir or '(none)'}"
                logger.error("stage %d: %s; the coordinator plans again", stage, message)
            elif method not in ("fresh", LOCAL_STATE):
                assert plan is not None
                try:
                    iteration, lr_scale, outer_parts = await obtain_weights(
                        self.transport, node_id, module, method, plan, config.recovery.lr_scale)
                except (grpc.aio.AioRpcError, ValidationError, ValueError) as exc:
                    # a replica the restarted coordinator still counts as live may be gone with the rest
                    # of the run: our own state then beats fresh weights
                    resumed = self._resume(module, stage, stored, plan)
                    if resumed is not None:
                        iteration, outer_parts, method, message = resumed
                        logger.warning("stage %d: %s failed (%s); resumed from --state-dir instead",
                                       stage, method, exc)
                    else:
                        ok = False
                        message = f"{method} failed: {exc}"
                        logger.error("stage %d: %s; keeping fresh weights", stage, message)
            # θ_global: the copied replica's, else the weights we start from (equal across fresh replicas;
            # a rebuilt stage enters its next outer sync with the rebuilt weights).
            module = module.to(self.device)
            outer = OuterSync(module, stage, node_id, config, self.client, self.token,
                              on_event=self.hooks.on_event, resync=self.hooks.resync, host=self.host)
            if outer_parts:
                try:
                    outer.load_parts(outer_parts, reset_local=method == LOCAL_STATE
                                     and not (stored is not None and stored.parts.get("local")))
                except ValueError as exc:
                    logger.warning("stage %d: replica's DiLoCo state unusable (%s); starting from local", stage, exc)
            # A moved node keeps the run's iteration even when the copy failed (and adopts the
            # iteration of its first microbatch anyway).
            iteration = max(iteration, previous_iteration)
            agent = await self._agent(module, stage, outer, iteration, lr_scale,
                                      adopt_next_iteration=method != "fresh" or previous_iteration > 0)
            self.current.agent, self.current.outer = agent, outer
            self.servicer.attach(stage=stage, agent=agent, state_provider=self.hooks.state_provider,
                                 shard_reducer=outer.reducer, outer_steps=outer.total_outer_steps)
            self._watchdog = asyncio.create_task(self._watch(agent), name="watchdog")
            self.events.context = {"node_id": node_id, "stage": stage}
            self.events.write("stage", method=method, iteration=iteration, ok=ok, message=message)
            logger.info("node %s holds stage %d (%s, iteration %d)", node_id, stage, method, iteration)
        return ok, message

    def _resume(self, module: torch.nn.Module, stage: int, stored: StageState | None,
                plan: pb.RecoveryPlan | None
                ) -> tuple[int, dict[str, dict[str, torch.Tensor]], str, str] | None:
        """Load this node's stored state of ``stage`` into ``module``: (iteration, outer parts, method,
        message), or None when there is none or it does not fit (``module`` is then as it was)."""
        if stored is None:
            return None
        # its own local weights when it wrote them (the exact model it had), else θ_global
        weights = stored.parts.get("local") or {**stored.theta_global, **stored.buffers}
        before = {name: t.clone() for name, t in module.state_dict().items()}
        try:
            module.load_state_dict(weights, strict=True)
        except (RuntimeError, ValueError) as exc:
            module.load_state_dict(before, strict=True)
            logger.error("stage %d: the stored state does not fit this stage (%s); obtaining it as planned "
                         "instead", stage, " ".join(str(exc).split())[:300])
            return None
        # what the coordinator's recovery log shows for its plan (a rebuild we did not need)
        planned = plan.method if plan is not None and plan.method else "fresh"
        message = f"resumed from its --state-dir at step {stored.inner_step}, outer steps {stored.outer_steps}"
        if planned != LOCAL_STATE:
            message += f" (instead of {planned})"
        return stored.inner_step, stored.parts, LOCAL_STATE, message

    def _stored(self, stage: int) -> StageState | None:
        """This node's own state of ``stage`` from its --state-dir, when it has a usable one."""
        if not self.state_dir:
            return None
        return resumable_state(self.state_dir, stage=stage, run_id=self.config.run_id,
                               num_stages=self.config.model.stages, model=dataclasses.asdict(self.config.model))

    async def _agent(self, module: torch.nn.Module, stage: int, outer: OuterSync, iteration: int,
                     lr_scale: float, *, adopt_next_iteration: bool) -> PipelineAgent:
        """The stage's runtime (inner optimizer, worker thread) and the agent that routes through it."""
        config, cfg, train = self.config, self.model_cfg, self.config.train
        optimizer = await asyncio.to_thread(build_inner_optimizer, module.parameters(), train, lr_scale)
        runtime = StageRuntime(module, stage, optimizer, grad_clip=train.grad_clip,
                               lr_fn=lambda it: lr_at(it, train), iteration=iteration,
                               iteration_timeout_s=3 * train.hop_timeout_s, slowdown=self.slowdown,
                               on_step=self.hooks.on_step, device=self.device, after_step=outer.after_step,
                               precision=train.precision)
        runtime.adopt_next_iteration = adopt_next_iteration
        return PipelineAgent(self.membership.node_id, config.run_id, runtime, self.transport, dim=cfg.dim,
                             max_seq_len=cfg.max_seq_len, codec=train.activation_codec,
                             gradient_codec=train.gradient_codec, subspace=subspace_basis(cfg),
                             hop_timeout_s=train.hop_timeout_s, num_stages=config.model.stages,
                             on_failure=self.hooks.on_failure, on_event=self.hooks.on_event,
                             refresh_schedule=self.hooks.refresh_schedule)

    @staticmethod
    async def _watch(agent: PipelineAgent) -> None:
        """Keep a stalled iteration from waiting longer than it must: the runtime closes one that made no
        progress for its timeout; before that, the agent asks the origins whether more of it is coming."""
        await asyncio.gather(agent.runtime.watchdog(), agent.ask_origins())

    async def _release(self) -> None:
        """Stop serving the current stage and free it (its worker thread, its outer-sync backend)."""
        self.servicer.detach()
        old = self.current.agent
        if old is not None:
            self.current.agent = None
            await old.close()
            old.runtime.shutdown()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.current.outer is not None:
            await self.current.outer.close()
            self.current.outer = None

    def stop_watchdog(self) -> None:
        """The node is leaving: no stalled iteration is closed or asked about any more."""
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def close(self) -> None:
        """At exit. The outer sync first: that releases a worker thread waiting for an outer round."""
        self.stop_watchdog()
        if self.current.outer is not None:
            await self.current.outer.close()
        agent = self.current.agent
        if agent is not None:
            await agent.close()
            agent.runtime.shutdown()


__all__ = ["CurrentStage", "StageAssembler", "StageHooks"]
