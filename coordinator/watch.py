"""What an operator watches: the run's status document, built from the coordinator's state.

One document serves every reader: the dashboard page and ``/api/status`` (coordinator/dashboard.py),
``/metrics`` (coordinator/prometheus.py) and ``lowband-coordinator status --json`` (through the Status
RPC's ``status_json``). The coordinator itself keeps only each node's latest counters; the history a
page draws (loss per origin, bytes per second by kind) is what :class:`RunWatch` samples from those
counters every ``sample_s`` seconds, so heartbeats, the hot path, stay untouched.

Bytes by kind come from what nodes report (``NodeMetrics``): activations, sync (DiLoCo exchanges),
state (weights streamed to recovering peers) and control (requests to the coordinator and the
peers' small RPCs). Per link, nodes count no bytes; a sender's activation bytes per second are shared over the
links the current SkipPipe paths send its activations (forward) and gradients (backward) along, in
proportion to how many paths use each, beside the link's last measured round trip and bandwidth.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowband.coordinator.core import LIVE_STATES, Coordinator, Member
from lowband.coordinator.store import EventRecord

logger = logging.getLogger(__name__)

KINDS = ("activations", "sync", "state", "control")
SAMPLE_S = 1.0          # a page refreshes every few seconds: a finer history would not be seen
LOSS_POINTS = 2000      # per origin; the oldest go first
RATE_POINTS = 600       # bytes-per-second samples (10 minutes at SAMPLE_S)
# a rate is taken over this window: heartbeats land at their own pace, so one sample's difference
# alone jumps between zero and twice the rate
RATE_WINDOW_S = 5.0
DEFAULT_EVENTS = 50
ROUTINE = frozenset(("sync-round",))   # every outer step of every stage: left out of ``membership_events``


def bytes_by_kind(member: Member) -> dict[str, int]:
    """A node's cumulative bytes sent, split by kind, as it reported them (``control``: its requests to the
    coordinator and peers' small RPCs; from a node that does not report it, the rest of ``bytes_sent``)."""
    m = member.metrics
    known = m.activation_bytes_sent + m.sync_bytes_sent + m.state_bytes_sent
    return {"activations": m.activation_bytes_sent, "sync": m.sync_bytes_sent, "state": m.state_bytes_sent,
            "control": m.control_bytes_sent or max(0, m.bytes_sent - known)}


@dataclass(slots=True)
class _Sample:
    time: float
    counters: dict[str, int]


class RunWatch:
    """Samples the coordinator's counters into a short history and builds the status document.

    Runs on the coordinator's event loop (``sample`` from a periodic task), like ``Coordinator``.
    """

    def __init__(self, core: Coordinator, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self._wall = wall_clock
        self.loss: dict[str, deque[tuple[float, int, float]]] = {}     # origin -> (time, step, loss)
        self.rates: deque[tuple[float, dict[str, float]]] = deque(maxlen=RATE_POINTS)
        self.node_rates: dict[str, dict[str, float]] = {}
        self._history: dict[str, deque[_Sample]] = {}   # per node, the samples of the last RATE_WINDOW_S
        self._rejected: dict[str, int] = {}   # rejected updates per node, as last seen

    def sample(self) -> None:
        """Take one sample: new loss points and the bytes per second since the previous sample."""
        now = self._wall()
        total = dict.fromkeys(KINDS, 0.0)
        for m in self.core.members.values():
            counters = bytes_by_kind(m)
            if m.stage == 0 and m.metrics.step > 0 and m.metrics.loss > 0:
                points = self.loss.setdefault(m.node_id, deque(maxlen=LOSS_POINTS))
                if not points or points[-1][1] != m.metrics.step:
                    points.append((now, m.metrics.step, m.metrics.loss))
            self._note_rejections(m)
            history = self._history.setdefault(m.node_id, deque())
            if history and any(counters[k] < history[-1].counters[k] for k in KINDS):
                history.clear()   # a node restarted under its old id counts from zero again
            if not history or now > history[-1].time:
                history.append(_Sample(now, counters))
            while len(history) > 2 and now - history[1].time >= RATE_WINDOW_S:
                history.popleft()
            first = history[0]
            if m.state not in LIVE_STATES or now <= first.time:
                self.node_rates.pop(m.node_id, None)
                continue
            rates = {k: (counters[k] - first.counters[k]) / (now - first.time) for k in KINDS}
            self.node_rates[m.node_id] = rates
            for k in KINDS:
                total[k] += rates[k]
        self.rates.append((now, total))

    def _note_rejections(self, m: Member) -> None:
        """An event when a node's count of refused pseudo-gradient parts grows (a bad or stale peer)."""
        count, seen = m.metrics.rejected_updates, self._rejected.get(m.node_id)
        self._rejected[m.node_id] = count
        # first sight (this coordinator just started): the count is history, already logged before
        if seen is not None and count > seen:
            last = f"; last: {m.metrics.last_rejection}" if m.metrics.last_rejection else ""
            self.core.note("rejected-update", m.node_id, m.stage,
                           f"refused {count - seen} pseudo-gradient part(s) as a shard owner "
                           f"({count} in all){last}")

    # -- the document -------------------------------------------------------------
    def document(self, max_events: int = DEFAULT_EVENTS, *, history: bool = True) -> dict[str, Any]:
        """The status document: plain JSON-friendly data, the one source of every view of the run.

        ``history=False`` leaves the loss and bytes-per-second series empty (``/metrics`` reads only the
        latest values; the series are most of the document's size and of its cost).
        """
        core = self.core
        nodes = [self._node(m) for m in core.members.values()]
        nodes.sort(key=lambda n: (n["state"] not in LIVE_STATES, n["stage"], n["node_id"]))
        events = list(core.events)[-max_events:] if max_events > 0 else []
        # joins, deaths, recoveries and the rest, which a run's many sync rounds would push out of ``events``
        notable = [e for e in core.events if e.kind not in ROUTINE][-max_events:] if max_events > 0 else []
        rejected = sum(m.metrics.rejected_updates for m in core.members.values())
        return {
            "time": self._wall(),
            "run_id": core.config.run_id,
            "epoch": core.epoch,
            "outer_step": core.outer_step(),
            "stages": core.num_stages,
            "steps": core.config.train.steps,
            "finishing": core.finishing,
            "stage_coverage": {str(s): c for s, c in sorted(core.coverage().items())},
            "nodes": nodes,
            "loss": {origin: [list(p) for p in points] for origin, points in self.loss.items()} if history else {},
            "bytes_per_s": {
                "kinds": list(KINDS),
                "now": self.rates[-1][1] if self.rates else dict.fromkeys(KINDS, 0.0),
                "series": [[t, *(r[k] for k in KINDS)] for t, r in self.rates] if history else [],
            },
            "links": self._links(),
            "paths": self._paths(),
            "sync_rounds": self._rounds(),
            "counts": {**dict(sorted(core.event_counts.items())), "rejected_updates": rejected},
            "events": [_event(e) for e in events],
            "membership_events": [_event(e) for e in notable],
        }

    def _node(self, m: Member) -> dict[str, Any]:
        x = m.metrics
        live = m.state in LIVE_STATES
        return {
            "node_id": m.node_id, "address": m.address, "stage": m.stage, "state": m.state,
            "heartbeat_age_s": round(self.core.heartbeat_age_s(m), 3), "heartbeat_rtt_s": x.heartbeat_rtt_s,
            "device": m.device, "throughput": m.throughput, "has_data": m.has_data, "memory_bytes": m.memory_bytes,
            "step": x.step, "outer_step": x.outer_step, "loss": x.loss, "val_loss": x.val_loss, "tokens": x.tokens,
            "tokens_per_s": x.tokens_per_s, "grad_norm": x.grad_norm, "bytes_sent": x.bytes_sent,
            "bytes_received": x.bytes_received, "activation_bytes_sent": x.activation_bytes_sent,
            "sync_bytes_sent": x.sync_bytes_sent, "state_bytes_sent": x.state_bytes_sent,
            "rejected_updates": x.rejected_updates,
            "rejected_peers": dict(sorted(x.rejected_peers.items())), "last_rejection": x.last_rejection,
            "bytes_sent_by_kind": bytes_by_kind(m),
            "bytes_per_s": self.node_rates.get(m.node_id, dict.fromkeys(KINDS, 0.0)) if live
            else dict.fromkeys(KINDS, 0.0),
        }

    def _paths(self) -> dict[str, Any]:
        cached = self.core.cached_plan()
        if cached is None:
            return {"epoch": 0, "current": False, "origins": {}}
        epoch, plan = cached
        return {"epoch": epoch, "current": epoch == self.core.epoch, "origins": {
            origin: [{"microbatch": p.microbatch, "stages": list(p.stages), "node_ids": list(p.node_ids)}
                     for p in paths] for origin, paths in sorted(plan.paths.items())}}

    def _links(self) -> list[dict[str, Any]]:
        """Every link that the current paths use or that a node measured (see the module docstring)."""
        uses: dict[tuple[str, str], int] = {}
        cached = self.core.cached_plan()
        for paths in cached[1].paths.values() if cached else ():
            for p in paths:
                for a, b in zip(p.node_ids, p.node_ids[1:], strict=False):
                    if a != b:
                        uses[(a, b)] = uses.get((a, b), 0) + 1    # activations forward
                        uses[(b, a)] = uses.get((b, a), 0) + 1    # their gradients backward
        out_uses: dict[str, int] = {}
        for (a, _), n in uses.items():
            out_uses[a] = out_uses.get(a, 0) + n
        live = {m.node_id for m in self.core.live_members()}
        measured = {k: v for k, v in self.core.link_matrix().items() if k[0] in live and k[1] in live}
        links = []
        for a, b in sorted(set(uses) | set(measured)):
            rtt, bandwidth = measured.get((a, b), (0.0, 0.0))
            rate = self.node_rates.get(a, {}).get("activations", 0.0)
            share = uses.get((a, b), 0) / out_uses[a] if out_uses.get(a) else 0.0
            links.append({"from": a, "to": b, "paths": uses.get((a, b), 0), "rtt_s": rtt,
                          "bandwidth_Bps": bandwidth, "activation_Bps": rate * share})
        return links

    def _rounds(self) -> list[dict[str, Any]]:
        rounds = self.core.rounds
        keys = sorted(set(rounds.formed_count) | set(rounds.failed_count))
        return [{"stage": s, "fragment": f, "formed": rounds.formed_count.get((s, f), 0),
                 "failed": rounds.failed_count.get((s, f), 0), "last_outer_step": rounds.last_formed_step((s, f))}
                for s, f in keys]


def _event(e: EventRecord) -> dict[str, Any]:
    return {"time": e.time, "kind": e.kind, "node_id": e.node_id, "stage": e.stage, "detail": e.detail}
