"""The coordinator's state and every operation on it, without gRPC.

`Coordinator` holds membership (leases on an injectable clock), stage
assignment, the current path plan, sync rounds, the link matrix and events, and
persists what must survive a restart through `Store`. Each public method takes
a request message and returns the reply message, raising `InvalidRequest`,
`UnknownNode` or `Conflict` on bad input *before* changing anything; the
servicer in server.py only maps those to gRPC status codes.

Instructions reach nodes in heartbeat replies, highest priority first:
REJOIN (the coordinator does not know the node as live), a pending
CHANGE_STAGE (repeated until the node reports the plan done with
ReportRecovery; nodes dedupe by plan_id), RELOAD_SCHEDULE (the node's epoch is
not the current one), else NONE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lowband.coordinator import validate
from lowband.coordinator.assignment import Move, choose_stage, fits, rebalance, resume_stage
from lowband.coordinator.errors import Conflict, IdentityRefused, InvalidRequest, UnknownNode
from lowband.coordinator.planning import PlanInputs, compute_plan
from lowband.coordinator.recovery import NodeRef, RecoveryError, plan_recovery
from lowband.coordinator.rounds import FormedRound, SyncRounds
from lowband.coordinator.skippipe.paths import PlannedPath
from lowband.coordinator.skippipe.schedule import Plan
from lowband.coordinator.store import EventRecord, MemberInfo, MemberRecord, Store
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import ConfigError, RunConfig
from lowband.protocols.stage_memory import stage_needs
from lowband.protocols.stored_stage import LOCAL_STATE, stage_fingerprint
from lowband.protocols.tokenizer import BpeTokenizer

logger = logging.getLogger(__name__)

ALIVE, DEAD, LEFT, RECOVERING = "alive", "dead", "left", "recovering"
LIVE_STATES = frozenset((ALIVE, RECOVERING))
FRESH = "fresh"
DEFAULT_STATUS_EVENTS = 50
Kind = pb.Instruction.Kind


@dataclass(slots=True, eq=False)
class Member(MemberInfo):
    last_seen: float                 # coordinator clock, for the lease
    metrics: pb.NodeMetrics = field(default_factory=pb.NodeMetrics)
    registered: bool = True          # False after a restart until the node joins again
    pending: pb.Instruction | None = None
    plan_id: int = 0                 # recovery plan the node is executing (0: none)
    plan_method: str = ""            # that plan's method, for the event log

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def ref(self) -> NodeRef:
        return NodeRef(self.node_id, self.address, self.throughput)

    def peer(self) -> pb.PeerInfo:
        return pb.PeerInfo(node_id=self.node_id, address=self.address, stage=self.stage)

    def record(self) -> MemberRecord:
        return MemberRecord(**self.info(), metrics=self.metrics.SerializeToString())


class Coordinator:
    """Membership, assignment, schedule and sync rounds of one run. Use from one thread/event loop."""

    def __init__(
        self,
        config: RunConfig,
        store: Store | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_events: int = 1000,
        tokenizer: BpeTokenizer | None = None,
    ) -> None:
        self.config = config
        if config.train.tokenizer == "bpe" and tokenizer is None:
            raise ConfigError("train.tokenizer = 'bpe': the coordinator needs the run's tokenizer to share it")
        self.tokenizer = tokenizer   # a BPE run's: every node that may be an origin gets it at join
        # what a node's stored stage state must match to be resumed here (protocols/stored_stage.py)
        self._fingerprint = stage_fingerprint(config.run_id, config.model.stages, dataclasses.asdict(config.model))
        self.num_stages = config.model.stages
        # bytes a node needs to host each stage (protocols/stage_memory.py): joins and moves respect it
        self._stage_needs = stage_needs(config)
        self._store = store
        self._clock = clock
        self._wall = wall_clock
        ms = config.membership
        self.lease_s = ms.lease_s
        # Data-parallel mode: every replica trains every step, so a late one is a straggler its round waits
        # for (up to sync_timeout_s), not one to leave out after the join window; a round formed without
        # it leaves it a round behind, and one formed by a replica that ran ahead leaves everyone else so.
        window = ms.sync_timeout_s if config.model.stages == 1 else ms.sync_join_window_s
        self.rounds = SyncRounds(window, ms.min_sync_participants, ms.sync_timeout_s, clock)
        self.members: dict[str, Member] = {}
        # node id -> SHA-256 of the identity it joined with (its secret, or its certificate's name under TLS);
        # in memory: after a restart the first rejoin under an id claims it
        self._identities: dict[str, bytes] = {}
        self.events: deque[EventRecord] = deque(maxlen=max_events)
        self.event_counts: dict[str, int] = {}   # events by kind since this process started (the deque forgets)
        self.epoch = 1
        self._links: dict[tuple[str, str], tuple[float, float]] = {}
        self._plan_cache: tuple[int, Plan] | None = None
        self._peers: tuple[int, list[pb.PeerInfo]] | None = None
        self._replies: tuple[int, pb.HeartbeatReply, pb.HeartbeatReply] | None = None
        self._dirty: set[str] = set()
        self._trained = False
        self._first_join: float | None = None
        self.finishing = False  # an origin finished train.steps: no more moves; SHUTDOWN once origins left
        self._shutdown = pb.HeartbeatReply(instruction=pb.Instruction(kind=Kind.SHUTDOWN))
        self._stages_seen: set[int] = set()   # stages some node has hosted (the others start "fresh")
        self._next_plan_id = 1
        self._config_json = config.to_json()
        self._rejoin = pb.HeartbeatReply(instruction=pb.Instruction(kind=Kind.REJOIN))
        if store is not None:
            self._load(store)
            self._check_tokenizer(store)

    def _check_tokenizer(self, store: Store) -> None:
        """A run keeps one tokenizer: its SHA-256 is recorded at the first start and a restart with any
        other (the cached file edited, another train.tokenizer) is refused, since the nodes' states and
        the data order were made with the first."""
        current = self.tokenizer.sha256 if self.tokenizer is not None else ""
        recorded = store.get_meta("tokenizer_sha256")
        if recorded is None:
            store.set_meta("tokenizer_sha256", current)
        elif recorded != current:
            raise ConfigError(f"this run directory's run was trained with tokenizer "
                              f"{recorded[:16] or 'bytes'}, not {current[:16] or 'bytes'} (the cached "
                              f"tokenizer file was changed?): restore it, or start a new run directory")
    # -- persistence ------------------------------------------------------------
    def _load(self, store: Store) -> None:
        now = self._clock()
        for rec in store.load_members():
            metrics = pb.NodeMetrics()
            if rec.metrics:
                metrics.ParseFromString(rec.metrics)
            # Live nodes get a fresh lease to re-register; until then their heartbeats get REJOIN.
            self.members[rec.node_id] = Member(**rec.info(), last_seen=now, metrics=metrics, registered=False)
            self._trained = self._trained or metrics.step > 0
        self.events.extend(store.recent_events(self.events.maxlen or 1000))
        self.rounds.restore([FormedRound(*row) for row in store.load_rounds()])
        self.epoch = int(store.get_meta("epoch") or 0) + 1
        self._next_plan_id = int(store.get_meta("next_plan_id") or 1)
        self._trained = self._trained or store.get_meta("trained") == "1"
        self._stages_seen = set(json.loads(store.get_meta("stages_seen") or "[]"))
        store.set_meta("epoch", str(self.epoch))
        if self.members:
            live = sum(m.live for m in self.members.values())
            logger.info("resumed from %s: %d members (%d live), epoch %d", store.path, len(self.members), live,
                        self.epoch)
            self._event("restart", "", -1, f"resumed with {live} live members; waiting for them to re-register")

    def _persist(self, member: Member) -> None:
        if member.state in LIVE_STATES and member.stage not in self._stages_seen:
            self._stages_seen.add(member.stage)
            if self._store is not None:
                self._store.set_meta("stages_seen", json.dumps(sorted(self._stages_seen)))
        if self._store is not None:
            self._store.upsert_member(member.record())
        self._dirty.discard(member.node_id)

    def flush_metrics(self) -> int:
        """Write the metrics that changed since the last flush in one transaction; returns how many."""
        if not self._dirty:
            return 0
        batch = [(i, self.members[i].metrics.SerializeToString()) for i in self._dirty if i in self.members]
        self._dirty.clear()
        if self._store is not None and batch:
            self._store.save_metrics(batch)
        return len(batch)

    def close(self) -> None:
        self.flush_metrics()
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- helpers ------------------------------------------------------------------
    def _event(self, kind: str, node_id: str, stage: int, detail: str = "") -> None:
        event = EventRecord(self._wall(), kind, node_id, stage, detail)
        self.events.append(event)
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        if self._store is not None:
            self._store.add_event(event)
        logger.info("event %s node=%s stage=%d epoch=%d %s", kind, node_id or "-", stage, self.epoch, detail)

    def note(self, kind: str, node_id: str, stage: int, detail: str = "") -> None:
        """Record an event observed outside the RPCs (the dashboard's sampler: rejected updates)."""
        self._event(kind, node_id, stage, detail)

    def _bump_epoch(self) -> None:
        self.epoch += 1  # the cached plan is now stale (kept: served while the next one is computed)
        self._peers = None
        if self._store is not None:
            self._store.set_meta("epoch", str(self.epoch))

    def _member(self, node_id: str, live: bool = True) -> Member:
        m = self.members.get(node_id)
        if m is None:
            raise UnknownNode(f"unknown node id {node_id!r}: join first")
        if live and not m.live:
            raise UnknownNode(f"node {node_id!r} is {m.state}: join again")
        return m

    def live_members(self) -> list[Member]:
        return [m for m in self.members.values() if m.live]

    def heartbeat_age_s(self, member: Member) -> float:
        """Seconds since ``member``'s last heartbeat, on the lease clock."""
        return max(0.0, self._clock() - member.last_seen)

    def coverage(self) -> dict[int, int]:
        """Live replicas per stage (every stage listed)."""
        cov = dict.fromkeys(range(self.num_stages), 0)
        for m in self.members.values():
            if m.state in LIVE_STATES:
                cov[m.stage] += 1
        return cov

    def _origins(self) -> dict[str, int]:
        """Data-shard index of each live origin (stage-0 node), dense, in order of first join.

        Join order (persisted) keeps indices stable as origins are added; they
        shift only when an earlier origin goes away.
        """
        origins = sorted((m for m in self.members.values() if m.stage == 0 and m.state in LIVE_STATES),
                         key=lambda m: (m.joined_at, m.node_id))
        return {m.node_id: i for i, m in enumerate(origins)}

    def _grad_norms(self) -> dict[int, float]:
        sums: dict[int, list[float]] = {}
        for m in self.members.values():
            if m.state == ALIVE and m.metrics.grad_norm > 0:
                sums.setdefault(m.stage, []).append(m.metrics.grad_norm)
        return {s: sum(v) / len(v) for s, v in sums.items()}

    def _new_plan_id(self) -> int:
        plan_id = self._next_plan_id
        self._next_plan_id += 1
        if self._store is not None:
            self._store.set_meta("next_plan_id", str(self._next_plan_id))
        return plan_id

    def _recovery_plan(self, stage: int, node: Member) -> pb.RecoveryPlan | None:
        """How `node` (a joiner or a node moved in) obtains the weights of `stage`.

        At the start of a run (no node has trained yet), or for a stage nobody
        has hosted before, it is "fresh" (initial weights from the run seed);
        otherwise the CheckFree helper (coordinator/recovery.py `plan_recovery`)
        picks replica-copy when the stage has a live replica, else a CheckFree
        rebuild. None when recovery.method is "none" and the stage was wiped.
        """
        if not self._trained or stage not in self._stages_seen:
            return pb.RecoveryPlan(stage=stage, method=FRESH, lr_scale=1.0, plan_id=self._new_plan_id())
        live: dict[int, list[NodeRef]] = {}
        unheard: dict[int, list[NodeRef]] = {}
        for m in self.members.values():
            # Only fully healthy nodes are sources: a recovering node has no weights to give yet. One this
            # coordinator restored from its store but has not heard from may be gone with the rest of the
            # run (a copy fetches from every source): it is a source only for a stage no other holds.
            if m.state == ALIVE and m.node_id != node.node_id:
                (live if m.registered else unheard).setdefault(m.stage, []).append(m.ref())
        for s, refs in unheard.items():
            live.setdefault(s, refs)
        try:
            plan = plan_recovery(stage, self.num_stages, live, candidates=[node.ref()],
                                 grad_norms=self._grad_norms(), lr_scale=self.config.recovery.lr_scale,
                                 epsilon=self.config.recovery.epsilon, mode=self.config.recovery.method,
                                 allow_move=False)
        except RecoveryError as exc:
            logger.warning("no recovery plan for stage %d: %s", stage, exc)
            return None
        msg = pb.RecoveryPlan(stage=stage, method=plan.method, lr_scale=plan.lr_scale, plan_id=self._new_plan_id())
        for node_id, address, src_stage, weight in plan.peers():
            msg.sources.add(node_id=node_id, address=address, stage=src_stage)
            msg.weights.append(weight)
        return msg

    def _apply_moves(self, moves: Iterable[Move]) -> None:
        for move in moves:
            m = self.members[move.node_id]
            plan = self._recovery_plan(move.to_stage, m)
            if plan is None:
                continue
            m.stage = move.to_stage
            m.state = ALIVE if plan.method == FRESH else RECOVERING
            m.plan_id = plan.plan_id
            m.plan_method = plan.method
            m.pending = pb.Instruction(kind=Kind.CHANGE_STAGE, stage=move.to_stage, recovery=plan)
            self._persist(m)
            self._event("move", m.node_id, move.to_stage,
                        f"from stage {move.from_stage} via {plan.method} (plan {plan.plan_id})")

    def _settling(self) -> bool:
        """Before any node has trained and within one lease of the first join, nodes are still
        arriving: preferences hold and no stage is "empty" yet, so nothing is moved."""
        return not self._trained and self._first_join is not None and \
            self._clock() - self._first_join < self.lease_s

    def _rebalance(self) -> None:
        if not self.config.membership.rebalance or self._settling() or self.finishing:
            return
        if min(self.coverage().values()) >= self.config.membership.min_replicas:
            return  # nothing to fix (the common case on a join)
        moves = rebalance(self.live_members(), self.num_stages, self.config.membership.min_replicas,
                          self._stage_needs)
        self._apply_moves(moves)

    # -- membership ---------------------------------------------------------------
    def join(self, req: pb.JoinRequest) -> pb.JoinReply:
        validate.join(req, self.num_stages)
        held = self._held_states(req)   # refuses malformed entries before anything changes
        if self.num_stages == 1 and not req.has_data:
            raise Conflict("model.stages = 1 (data-parallel mode): every node is an origin and trains on its "
                           "own data; start this node without --no-data")
        now = self._clock()
        old = self.members.get(req.node_id) if req.node_id else None
        node_id = req.node_id or self._new_node_id()
        self._bind_identity(node_id, req.secret, old)
        member = Member(node_id, req.address, req.device, req.memory_bytes, req.throughput, req.version,
                        req.has_data, -1, ALIVE, old.joined_at if old else self._wall(), now,
                        old.metrics if old else pb.NodeMetrics())
        instruction = pb.Instruction(kind=Kind.NONE)
        if req.stage >= 0:
            # Re-registration: the node holds this stage's weights, so the assignment holds.
            member.stage = req.stage
            stale = old is not None and not old.live
            peers_alive = any(m.state == ALIVE and m.stage == req.stage and m.node_id != node_id
                              for m in self.members.values())
            if stale and peers_alive and self._trained:
                plan = self._recovery_plan(req.stage, member)  # its weights are old: copy a live replica
                if plan is not None:
                    instruction = pb.Instruction(kind=Kind.RECOVER, stage=req.stage, recovery=plan)
            kind = "rejoin"
        else:
            if self._first_join is None:
                self._first_join = now
            others = [m for m in self.members.values() if m.state in LIVE_STATES and m.node_id != node_id]
            resume = resume_stage({s: o for s, (o, _) in held.items()}, self._sourced_stages(node_id))
            preferred = req.preferred_stage
            if resume is not None and req.preferred_stage < 0:
                preferred = resume[0]   # the stage its state directory holds: a replica copy updates it
            plan: pb.RecoveryPlan | None
            if resume is not None and resume[1]:
                # no live replica holds the stage (the whole run was lost): the node's own state is the
                # newest there is, and restoring it beats filling another stage first
                member.stage = resume[0]
                plan = pb.RecoveryPlan(stage=member.stage, method=LOCAL_STATE, lr_scale=1.0,
                                       plan_id=self._new_plan_id())
            elif self._settling() and 0 <= preferred < self.num_stages and (preferred != 0 or req.has_data):
                member.stage = preferred
                plan = self._recovery_plan(member.stage, member)
            else:
                member.stage = choose_stage(others, member, self.num_stages,
                                            self.config.membership.min_replicas, preferred,
                                            need=self._stage_needs)
                if not fits(member, member.stage, self._stage_needs):
                    logger.warning("node %s reported %d bytes free, below the %d stage %d is estimated to "
                                   "need (the lightest it may host)", node_id, member.memory_bytes,
                                   self._stage_needs[member.stage], member.stage)
                plan = self._recovery_plan(member.stage, member)
            if plan is not None:
                instruction = pb.Instruction(kind=Kind.RECOVER, stage=member.stage, recovery=plan)
            kind = "join" if old is None else "rejoin"
        if instruction.kind == Kind.RECOVER:
            member.plan_id = instruction.recovery.plan_id
            member.plan_method = instruction.recovery.method
            if instruction.recovery.method != FRESH:
                member.state = RECOVERING
        self.members[node_id] = member
        self._persist(member)
        self._bump_epoch()
        detail = f"{req.address} {req.device} throughput={req.throughput:g}"
        if instruction.kind == Kind.RECOVER:
            detail += f" via {instruction.recovery.method}"
            if instruction.recovery.method == LOCAL_STATE:
                outer, inner = held[member.stage]
                detail += f" (its stored state at outer step {outer}, step {inner})"
        self._event(kind, node_id, member.stage, detail)
        self._rebalance()
        if member.pending is not None:  # the re-balance moved the joiner itself
            instruction = member.pending
        origins = self._origins()
        reply = pb.JoinReply(
            node_id=node_id, stage=member.stage, run_config_json=self._config_json, epoch=self.epoch,
            heartbeat_interval_s=self.config.membership.heartbeat_interval_s, lease_s=self.lease_s,
            origin_index=origins.get(node_id, -1), num_origins=len(origins), instruction=instruction)
        if self.tokenizer is not None:
            reply.tokenizer_sha256 = self.tokenizer.sha256
            if req.has_data and req.tokenizer_sha256 != self.tokenizer.sha256:
                reply.tokenizer_json = self.tokenizer.json   # it may be an origin and does not hold it yet
        return reply

    def _held_states(self, req: pb.JoinRequest) -> dict[int, tuple[int, int]]:
        """The stage states a joiner's --state-dir holds that this run can resume: stage -> (outer step,
        inner step). None of them before the run has trained (a new run never continues an old one's
        weights), nor of another run or model (fingerprint), nor stage 0 for a node without data."""
        if len(req.stored_stages) > 64:
            raise InvalidRequest(f"JoinRequest.stored_stages has {len(req.stored_stages)} entries; at most 64")
        held: dict[int, tuple[int, int]] = {}
        for i, st in enumerate(req.stored_stages):
            if not 0 <= st.stage < self.num_stages or st.outer_step < 0 or st.inner_step < 0:
                raise InvalidRequest(f"stored_stages[{i}]: stage {st.stage} at outer step {st.outer_step}, "
                                     f"step {st.inner_step} is out of range ({self.num_stages} stages)")
            if not self._trained or st.fingerprint != self._fingerprint or (st.stage == 0 and not req.has_data):
                continue
            if st.stage not in held or (st.outer_step, st.inner_step) > held[st.stage]:
                held[st.stage] = (st.outer_step, st.inner_step)
        return held

    def _sourced_stages(self, joiner: str) -> set[int]:
        """Stages with a replica a joiner could copy: healthy and heard from since this coordinator started
        (a member restored from the store that has not re-registered may be gone with the rest of the run)."""
        return {m.stage for m in self.members.values()
                if m.state == ALIVE and m.registered and m.node_id != joiner}

    def _bind_identity(self, node_id: str, secret: bytes, old: Member | None) -> None:
        """Refuse a join under the id of a live node that joined with another identity (an impostor, or the
        same node restarted without its secret: it gets in once the old lease ends); else bind the id to it."""
        if len(secret) > 256:
            raise InvalidRequest(f"JoinRequest.secret is {len(secret)} bytes; at most 256")
        digest = hashlib.sha256(secret).digest()
        known = self._identities.get(node_id)
        if old is not None and old.live and known is not None and not hmac.compare_digest(known, digest):
            logger.warning("join as %s refused: the id is held by a live node with another identity", node_id)
            raise IdentityRefused(f"node id {node_id!r} is held by a live node with another identity")
        self._identities[node_id] = digest

    def _new_node_id(self) -> str:
        while True:
            node_id = "n-" + uuid.uuid4().hex[:12]
            if node_id not in self.members:
                return node_id

    def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        """Renew the lease and take the metrics; the hot path (thousands per second)."""
        validate.heartbeat(req)
        m = self.members.get(req.node_id)
        if m is None or not m.registered or m.state not in LIVE_STATES:
            return self._rejoin
        m.last_seen = self._clock()
        m.metrics = req.metrics
        self._dirty.add(m.node_id)
        if not self._trained and req.metrics.step > 0:
            self._trained = True
            if self._store is not None:
                self._store.set_meta("trained", "1")
        if m.stage == 0 and req.metrics.step >= self.config.train.steps and not self.finishing:
            self.finishing = True
            self._event("finishing", m.node_id, m.stage, f"origin reached step {req.metrics.step}")
        if self.finishing and m.stage != 0 and not any(o.live and o.stage == 0 for o in self.members.values()):
            # The last origin has finished its final evaluation and left: the run is over.
            return self._shutdown
        if m.pending is not None:
            return pb.HeartbeatReply(epoch=self.epoch, instruction=m.pending)
        cached = self._replies
        if cached is None or cached[0] != self.epoch:
            cached = self._replies = (
                self.epoch,
                pb.HeartbeatReply(epoch=self.epoch, instruction=pb.Instruction(kind=Kind.NONE)),
                pb.HeartbeatReply(epoch=self.epoch, instruction=pb.Instruction(kind=Kind.RELOAD_SCHEDULE)),
            )
        return cached[1] if req.epoch == self.epoch else cached[2]

    def leave(self, req: pb.LeaveRequest) -> pb.LeaveReply:
        validate.leave(req)
        m = self._member(req.node_id, live=False)
        if m.live:
            if req.HasField("metrics"):
                # the node's last step may have come after its last heartbeat; without these the run's
                # status would end a step short of where the node did
                m.metrics = req.metrics
            self._drop(m, LEFT, req.reason or "graceful leave")
        return pb.LeaveReply(ok=True)

    def _drop(self, m: Member, state: str, detail: str, replan: bool = True) -> None:
        m.state = state
        m.pending = None
        m.plan_id = 0
        self._persist(m)
        self._event("death" if state == DEAD else "leave", m.node_id, m.stage,
                    f"{detail} (step {m.metrics.step}, outer step {m.metrics.outer_step})")
        if replan:
            self._bump_epoch()
            self._rebalance()

    def expire_leases(self) -> list[str]:
        """Mark every node whose lease ran out dead, then re-plan once; returns their ids.

        All at once, so a re-balance never moves a node that is itself about to be declared dead.
        """
        deadline = self._clock() - self.lease_s
        expired = [m for m in self.members.values() if m.live and m.last_seen < deadline]
        for m in expired:
            why = "lease expired" if m.registered else "did not re-register after a coordinator restart"
            self._drop(m, DEAD, why, replan=False)
        if expired:
            self._bump_epoch()
        self._rebalance()  # cheap when every stage is covered
        return [m.node_id for m in expired]

    def report_failure(self, req: pb.FailureReport) -> pb.Ack:
        """A peer could not reach `suspect`. Declared dead at once only if its heartbeats are late too."""
        validate.failure(req)
        self._member(req.reporter_id)
        suspect = self._member(req.suspect_id, live=False)
        if not suspect.live:
            return pb.Ack(ok=True, message=f"{req.suspect_id} is already {suspect.state}")
        late = self._clock() - suspect.last_seen > 2 * self.config.membership.heartbeat_interval_s
        self._event("suspect", suspect.node_id, suspect.stage, f"reported by {req.reporter_id}: {req.reason}")
        if late:
            self._drop(suspect, DEAD, f"reported by {req.reporter_id} and heartbeat late")
            return pb.Ack(ok=True, message=f"{req.suspect_id} declared dead")
        return pb.Ack(ok=True, message=f"{req.suspect_id} still heartbeating; not declared dead")

    def report_recovery(self, req: pb.RecoveryReport) -> pb.Ack:
        validate.recovery(req)
        m = self._member(req.node_id)
        if m.plan_id != req.plan_id:
            raise UnknownNode(f"node {req.node_id!r} has no recovery plan {req.plan_id} "
                              f"(current: {m.plan_id or 'none'})")
        m.pending = None
        m.plan_id = 0
        if req.success:
            m.state = ALIVE
            # A fresh start from the run seed is not a recovery: log it as "ready"; a stage resumed from
            # a node's own state directory as "resume".
            kind = {FRESH: "ready", LOCAL_STATE: "resume"}.get(m.plan_method, "recovery")
            detail = f"{m.plan_method or 'plan'} (plan {req.plan_id}) done {req.message}".strip()
            self._event(kind, m.node_id, m.stage, detail)
        elif m.plan_method == LOCAL_STATE and (plan := self._recovery_plan(m.stage, m)) is not None:
            # its stored state turned out unusable: obtain the stage as any joiner would (a copy, a rebuild)
            self._event("recovery-failed", m.node_id, m.stage,
                        f"plan {req.plan_id}: {req.message}; now {plan.method} (plan {plan.plan_id})")
            m.plan_id, m.plan_method = plan.plan_id, plan.method
            m.state = ALIVE if plan.method == FRESH else RECOVERING
            m.pending = pb.Instruction(kind=Kind.RECOVER, stage=m.stage, recovery=plan)
        else:
            # It holds whatever weights it has; keep it in the pipeline rather than leave a hole.
            m.state = ALIVE
            self._event("recovery-failed", m.node_id, m.stage, f"plan {req.plan_id}: {req.message}")
        self._persist(m)
        self._bump_epoch()
        return pb.Ack(ok=True)

    def report_links(self, req: pb.LinkReport) -> pb.Ack:
        validate.links(req)
        self._member(req.node_id)
        for i, link in enumerate(req.links):
            if link.peer_id not in self.members:
                raise UnknownNode(f"links[{i}].peer_id {link.peer_id!r} is not a known node")
        for link in req.links:
            self._links[(req.node_id, link.peer_id)] = (link.rtt_s, link.bandwidth_bytes_per_s)
        return pb.Ack(ok=True, message=f"{len(req.links)} links recorded")

    def link_matrix(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(from, to) -> (rtt seconds, bandwidth bytes/s) as last reported."""
        return dict(self._links)

    # -- schedule -----------------------------------------------------------------
    def plan_inputs(self) -> PlanInputs:
        """Snapshot of what the planner needs: routable nodes and the measured link matrix.

        A recovering node carries traffic only if its stage has no healthy replica.
        """
        routable = [m for m in self.members.values() if m.state == ALIVE]
        covered = {m.stage for m in routable}
        routable += [m for m in self.members.values() if m.state == RECOVERING and m.stage not in covered]
        routable.sort(key=lambda m: (m.stage, m.node_id))
        routable_ids = {m.node_id for m in routable}
        links = tuple((a, b, rtt, bw) for (a, b), (rtt, bw) in self._links.items()
                      if a in routable_ids and b in routable_ids)
        return PlanInputs(self.epoch, self.config, tuple((m.node_id, m.stage, m.throughput) for m in routable), links,
                          tuple((m.node_id, m.device, m.memory_bytes) for m in routable))

    def _plan(self) -> Plan:
        """The one call site of the path planner (coordinator/skippipe/planner.py via planning.compute_plan)."""
        return compute_plan(self.plan_inputs())

    def plan_stale(self) -> bool:
        return self._plan_cache is None or self._plan_cache[0] != self.epoch

    def install_plan(self, epoch: int, plan: Plan) -> bool:
        """Adopt a plan computed elsewhere (a worker thread) if it is still for the current epoch."""
        if epoch != self.epoch:
            return False
        self._plan_cache = (epoch, plan)
        self._log_plan(plan)
        return True

    def install_stale_plan(self, epoch: int, plan: Plan) -> None:
        """Keep a plan for an older epoch as the best available (served with allow_stale)."""
        if self._plan_cache is None or self._plan_cache[0] < epoch:
            self._plan_cache = (epoch, plan)

    def cached_plan(self) -> tuple[int, Plan] | None:
        """The last plan computed and its epoch, without planning (what the dashboard draws)."""
        return self._plan_cache

    def current_plan(self) -> Plan:
        if self.plan_stale():
            started = time.perf_counter()
            plan = self._plan()
            self._plan_cache = (self.epoch, plan)
            self._log_plan(plan, time.perf_counter() - started)
        assert self._plan_cache is not None
        return self._plan_cache[1]

    def _log_plan(self, plan: Plan, seconds: float | None = None) -> None:
        took = f" in {1000 * seconds:.1f} ms" if seconds is not None else ""
        logger.info("planned epoch %d (%s): %d origins, %d paths%s", self.epoch, self.config.skippipe.planner,
                    len(plan.paths), sum(len(p) for p in plan.paths.values()), took)
        if not plan.paths:
            logger.warning("no paths in epoch %d: coverage %s", self.epoch, self.coverage())

    def _peer_list(self) -> list[pb.PeerInfo]:
        if self._peers is None or self._peers[0] != self.epoch:
            self._peers = (self.epoch, [m.peer() for m in self.members.values() if m.live])
        return self._peers[1]

    def schedule(self, req: pb.ScheduleRequest, allow_stale: bool = False) -> pb.ScheduleReply:
        """The asking node's paths, visits and peers.

        With `allow_stale` (membership changing faster than plans are computed)
        the last computed plan is served with *its* epoch, so the node sees
        RELOAD_SCHEDULE on its next heartbeat and asks again.
        """
        validate.node_id(req.node_id)
        m = self._member(req.node_id)
        if allow_stale and self._plan_cache is not None:
            epoch, plan = self._plan_cache
        else:
            epoch, plan = self.epoch, self.current_plan()
        origins = self._origins()
        reply = pb.ScheduleReply(epoch=epoch, stage=m.stage, origin_index=origins.get(m.node_id, -1),
                                 num_origins=len(origins))
        for path in plan.paths.get(m.node_id, []):
            reply.paths.append(_path_msg(path))
        reply.peers.extend(self._peer_list())
        for origin, count in plan.visits.get(m.node_id, {}).items():
            reply.visits[origin] = count
        return reply

    # -- sync rounds ----------------------------------------------------------------
    def sync_round(self, req: pb.SyncRoundRequest) -> pb.SyncRoundReply:
        validate.sync_round(req, self.num_stages, self.config.diloco.fragments)
        m = self._member(req.node_id)
        if m.stage != req.stage:
            raise Conflict(f"node {req.node_id!r} hosts stage {m.stage}, not stage {req.stage}")
        if m.state != ALIVE:
            raise Conflict(f"node {req.node_id!r} is {m.state}: it joins sync rounds once it holds the weights")
        healthy = [x.node_id for x in self.members.values() if x.state == ALIVE and x.stage == req.stage]
        status = self.rounds.request(req.node_id, req.stage, req.fragment, req.outer_step, healthy,
                                     self._scheduled(healthy), maddrs=req.sync_maddrs)
        for formed in self.rounds.formed:
            if self._store is not None:
                self._store.save_round(formed.stage, formed.fragment, formed.round_id, formed.outer_step,
                                       formed.participants)
            self._event("sync-round", "", formed.stage,
                        f"fragment {formed.fragment} round {formed.round_id} outer step {formed.outer_step}: "
                        f"{len(formed.participants)} participants")
        self.rounds.formed.clear()
        reply = pb.SyncRoundReply(round_id=status.round_id, ready=status.ready, retry_after_s=status.retry_after_s,
                                  abandoned=status.abandoned, reason=status.reason, outer_step=status.outer_step,
                                  adopt_outer_step=status.adopt_outer_step)
        for node_id, maddrs in zip(status.participants, status.maddrs, strict=True):
            p = self.members.get(node_id)
            reply.participants.add(node_id=node_id, address=p.address if p else "",
                                   stage=p.stage if p else req.stage, sync_maddrs=maddrs)
        return reply

    def _scheduled(self, node_ids: list[str]) -> list[str] | None:
        """Those of ``node_ids`` the current plan routes microbatches through: the replicas a sync round
        waits for. The planner may leave a slow or distant replica idle (that is its best makespan); an
        idle replica takes no inner steps and never asks, so rounds must not wait for it. None (wait for
        every one) while the plan is not yet computed for the current membership."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            return None
        visits = self._plan_cache[1].visits
        return [n for n in node_ids if visits.get(n)]

    # -- status ---------------------------------------------------------------------
    def outer_step(self) -> int:
        reported = max((m.metrics.outer_step for m in self.members.values() if m.live), default=0)
        return max(reported, self.rounds.max_outer_step(), 0)

    def status(self, req: pb.StatusRequest) -> pb.StatusReply:
        validate.status(req)
        now = self._clock()
        reply = pb.StatusReply(epoch=self.epoch, outer_step=self.outer_step(), run_config_json=self._config_json)
        if req.tokenizer and self.tokenizer is not None:
            reply.tokenizer_json = self.tokenizer.json
        for m in self.members.values():
            reply.nodes.add(node_id=m.node_id, address=m.address, stage=m.stage, state=m.state,
                            heartbeat_age_s=max(0.0, now - m.last_seen), metrics=m.metrics,
                            throughput=m.throughput, device=m.device, has_data=m.has_data,
                            memory_bytes=m.memory_bytes)
        for stage, count in self.coverage().items():
            reply.stage_coverage[stage] = count
        limit = req.max_events or DEFAULT_STATUS_EVENTS
        for e in list(self.events)[-limit:]:
            reply.events.add(time=e.time, kind=e.kind, node_id=e.node_id, stage=e.stage, detail=e.detail)
        return reply


def _path_msg(path: PlannedPath) -> pb.Path:
    return pb.Path(microbatch=path.microbatch, stages=path.stages, node_ids=path.node_ids)
