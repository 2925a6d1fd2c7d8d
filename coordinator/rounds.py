"""Sync-round quorum per (stage, fragment): who averages together at an outer step (pure).

Replicas of a stage call in when they reach an outer step; the round forms
when it can, and every caller polls (non-blocking) until it has. A round forms:

- at once when every healthy replica of the stage has asked;
- at once (fast path) when every participant of the previous round that is
  still healthy is back, that round was the whole stage (nobody healthy was
  left out) and no replica is new since, and there are at least the minimum;
  a round that left someone out is followed by one that waits the window;
- after the join window, with whoever has asked, if at least the minimum;
- never, if the minimum is still not reached at the timeout: the round is
  abandoned and callers skip this sync and keep training.

Round ids are monotonic per (stage, fragment); participants are sorted by node
id so every caller sees the same order (shard j is reduced by participant j).
A caller that asks after its round formed without it gets the formed round
(and sees it is not a participant); it then copies the group's outer state
from a replica that took part. When no replica that took part in the last
formed round is healthy any more (every replica of the stage died and it was
rebuilt), there is nobody to copy from: such a reply carries
``adopt_outer_step``, the last outer step formed, so the rebuilt replicas
continue the round numbering together instead of asking for past rounds
forever. The clock is injected so tests can drive it.

With ``diloco.backend = "hivemind"`` each caller also says where its DHT
listens (``maddrs``); the round hands every participant's latest maddrs back
with the participants, so the replicas of a stage connect their DHTs to each
other without a bootstrap peer of their own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

Key = tuple[int, int]  # (stage, fragment)


@dataclass(frozen=True, slots=True)
class RoundStatus:
    """The answer to one poll."""

    round_id: int
    outer_step: int
    ready: bool
    participants: tuple[str, ...] = ()
    retry_after_s: float = 0.0
    abandoned: bool = False
    reason: str = ""
    adopt_outer_step: int = 0    # > 0: the stage's lineage died; continue from this outer step
    maddrs: tuple[tuple[str, ...], ...] = ()   # per participant (same order): its DHT multiaddrs, if any


@dataclass(slots=True)
class _Round:
    round_id: int
    outer_step: int
    opened_at: float
    askers: list[str] = field(default_factory=list)
    participants: tuple[str, ...] | None = None
    abandoned: str = ""


@dataclass(frozen=True, slots=True)
class FormedRound:
    """A formed round, as persisted so a restarted coordinator answers late pollers the same way."""

    stage: int
    fragment: int
    round_id: int
    outer_step: int
    participants: tuple[str, ...]


class SyncRounds:
    """Round state for every (stage, fragment); plain class, injectable clock."""

    def __init__(
        self,
        join_window_s: float,
        min_participants: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        keep: int = 8,
    ) -> None:
        self.join_window_s = join_window_s
        self.min_participants = min_participants
        self.timeout_s = max(timeout_s, join_window_s)
        self._clock = clock
        self._keep = keep
        self._rounds: dict[Key, dict[int, _Round]] = {}   # by outer step
        self._next_id: dict[Key, int] = {}
        self._max_step: dict[Key, int] = {}
        self._max_formed: dict[Key, int] = {}              # the last outer step a round formed for
        self._last_formed: dict[Key, tuple[str, ...]] = {}
        self._known: dict[Key, set[str]] = {}             # healthy replicas when the last round formed
        self._maddrs: dict[int, dict[str, tuple[str, ...]]] = {}   # stage -> node -> its latest DHT maddrs
        self.formed: list[FormedRound] = []                # newly formed, drained by the caller
        # rounds formed and abandoned since this coordinator started, per key (the dashboard's counters)
        self.formed_count: dict[Key, int] = {}
        self.failed_count: dict[Key, int] = {}

    def restore(self, rounds: Collection[FormedRound]) -> None:
        """Resume after a restart from the last formed round of each key."""
        for r in rounds:
            key = (r.stage, r.fragment)
            self._next_id[key] = max(self._next_id.get(key, 0), r.round_id + 1)
            self._max_step[key] = max(self._max_step.get(key, -1), r.outer_step)
            self._max_formed[key] = max(self._max_formed.get(key, 0), r.outer_step)
            self._last_formed[key] = r.participants
            self._known[key] = set(r.participants)
            self._rounds.setdefault(key, {})[r.outer_step] = _Round(
                r.round_id, r.outer_step, self._clock(), list(r.participants), r.participants)

    def last_formed_step(self, key: Key) -> int:
        """The last outer step a round of ``key`` formed for (0 before the first)."""
        return self._max_formed.get(key, 0)

    def max_outer_step(self) -> int:
        """The highest outer step any formed round completes (-1 before the first)."""
        steps = [r.outer_step for rounds in self._rounds.values() for r in rounds.values()
                 if r.participants is not None]
        return max(steps, default=-1)

    def request(
        self, node_id: str, stage: int, fragment: int, outer_step: int, healthy: Collection[str],
        expected: Collection[str] | None = None, maddrs: Sequence[str] = (),
    ) -> RoundStatus:
        """One poll by `node_id` (a healthy replica of `stage`) for the round completing `outer_step`.

        `healthy` is the set of healthy replicas of the stage right now: any of them that asks takes
        part. `expected` (default: all of `healthy`) are those the round waits for: a replica that the
        path plan routes no microbatch through takes no inner steps, so it never asks, and waiting the
        join window for it at every round would only slow the others down. `maddrs` (may be empty) is
        where the caller's hivemind DHT listens now.
        """
        self._note_maddrs(node_id, stage, maddrs, healthy)
        key = (stage, fragment)
        rounds = self._rounds.setdefault(key, {})
        r = rounds.get(outer_step)
        if r is None:
            latest = self._max_step.get(key, -1)
            if outer_step < latest:
                return RoundStatus(0, outer_step, ready=False, abandoned=True,
                                   reason=f"stale outer step {outer_step}: stage {stage} fragment "
                                          f"{fragment} is already at outer step {latest}",
                                   adopt_outer_step=self._orphaned(key, healthy))
            round_id = self._next_id.get(key, 1)
            self._next_id[key] = round_id + 1
            self._max_step[key] = max(latest, outer_step)
            r = _Round(round_id, outer_step, self._clock())
            rounds[outer_step] = r
            self._trim(rounds)
        if r.participants is None and not r.abandoned and node_id not in r.askers:
            r.askers.append(node_id)
        if r.participants is None and not r.abandoned:
            self._evaluate(key, r, healthy, healthy if expected is None else expected)
        status = self._status(r)
        if status.ready:
            known = self._maddrs.get(stage, {})
            status = dataclasses.replace(status, maddrs=tuple(known.get(p, ()) for p in status.participants))
        if status.ready and node_id not in status.participants:
            status = dataclasses.replace(status, adopt_outer_step=self._orphaned(key, healthy))
        return status

    def _note_maddrs(self, node_id: str, stage: int, maddrs: Sequence[str], healthy: Collection[str]) -> None:
        """Remember the caller's latest DHT maddrs (a restarted DHT listens elsewhere); only the stage's
        healthy replicas are kept, so the table is bounded by the stage's size."""
        known = self._maddrs.setdefault(stage, {})
        if maddrs:
            known[node_id] = tuple(maddrs)
        alive = set(healthy)
        for gone in [n for n in known if n not in alive]:
            del known[gone]

    def _orphaned(self, key: Key, healthy: Collection[str]) -> int:
        """The last formed outer step of ``key`` when none of its last round's participants is healthy
        (nobody holds the stage's outer state to copy), else 0."""
        if set(self._last_formed.get(key, ())) & set(healthy):
            return 0
        return self._max_formed.get(key, 0)

    def _evaluate(self, key: Key, r: _Round, healthy: Collection[str], expected: Collection[str]) -> None:
        now = self._clock()
        healthy_set = set(healthy)
        present = [a for a in r.askers if a in healthy_set]
        waited_for = (set(expected) & healthy_set) | set(present)
        enough = len(present) >= self.min_participants
        previous = set(self._last_formed.get(key, ())) & waited_for
        everyone = bool(present) and waited_for <= set(present)
        # The fast path skips the window only when the previous round was the whole stage
        # (every replica healthy then took part) and no replica is new since; otherwise a
        # replica that once formed a round alone would keep forming rounds alone, and a
        # late or new replica would never be waited for again.
        known = self._known.get(key, set())
        complete = known <= set(self._last_formed.get(key, ()))
        fast = bool(previous) and previous <= set(present) and complete and waited_for <= known
        waited = now - r.opened_at
        if enough and (everyone or fast or waited >= self.join_window_s):
            r.participants = tuple(sorted(present))
            self._last_formed[key] = r.participants
            self._max_formed[key] = max(self._max_formed.get(key, 0), r.outer_step)
            self._known[key] = waited_for
            self.formed.append(FormedRound(key[0], key[1], r.round_id, r.outer_step, r.participants))
            self.formed_count[key] = self.formed_count.get(key, 0) + 1
        elif waited >= self.timeout_s:
            self.failed_count[key] = self.failed_count.get(key, 0) + 1
            r.abandoned = (f"quorum not reached: {len(present)} of at least {self.min_participants} "
                           f"participants within {self.timeout_s:g} s")

    def _status(self, r: _Round) -> RoundStatus:
        if r.abandoned:
            return RoundStatus(r.round_id, r.outer_step, ready=False, abandoned=True, reason=r.abandoned)
        if r.participants is not None:
            return RoundStatus(r.round_id, r.outer_step, ready=True, participants=r.participants)
        remaining = self.join_window_s - (self._clock() - r.opened_at)
        if remaining <= 0:  # past the window but short of the minimum: wait toward the timeout
            remaining = self.timeout_s - (self._clock() - r.opened_at)
        retry = max(0.02, min(remaining, self.join_window_s / 10.0, 0.25))
        return RoundStatus(r.round_id, r.outer_step, ready=False, retry_after_s=retry)

    def _trim(self, rounds: dict[int, _Round]) -> None:
        while len(rounds) > self._keep:
            del rounds[min(rounds)]
