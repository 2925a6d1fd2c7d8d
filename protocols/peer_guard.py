"""Who keeps sending garbage: per-peer strike counts, cool-downs and rate-limited log lines.

Shared by the gRPC servers (``protocols/hostile.py``) and the activation wire. A
*strike* is input an honest peer of this version cannot send: bytes that do not
parse as the method's protobuf, or a wire frame that breaks the framing. A
message that parses but fails validation (NaN activations from a diverging run,
a stale header) is refused without a strike, and so is a wrong run token: both
happen to honest but misconfigured or unlucky nodes, and ``peer_host`` keys on
the host, so on a shared host (a local run on 127.0.0.1) a strike counts
against every process there.

Policy (``GuardPolicy``): ``strikes`` strikes within ``window_s`` seconds put the
peer's host in a cool-down of ``cooldown_s`` seconds, during which its calls are
refused at once (gRPC: RESOURCE_EXHAUSTED; wire: the connection is closed on
accept) without reading or parsing anything. Defaults: 10 strikes in 60 s, 60 s
of cool-down: honest peers never strike, so a small number suffices, and a
minute costs an attacker a reconnect-and-retry loop while a node recovering from
a bug (say, after an upgrade to a mismatched version) is back within a minute.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0   # at most one bad-input line per peer this often; the next line counts the suppressed
MAX_PEERS = 4096        # bounded tables: a flood from many addresses must not grow memory without end


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:/p``) or of a
    ``host:port`` string; reconnecting from another port must not reset a peer's record."""
    kind, sep, rest = peer.partition(":")
    if sep and kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or rest
    if sep and kind != "unix" and (peer.startswith("[") or peer.count(":") == 1):
        return peer.rpartition(":")[0].strip("[]") or peer
    return peer


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """``strikes`` strikes within ``window_s`` seconds: refused for ``cooldown_s`` seconds (``strikes`` 0: never)."""

    strikes: int = 10
    window_s: float = 60.0
    cooldown_s: float = 60.0

    def __post_init__(self) -> None:
        if self.strikes < 0 or self.window_s <= 0 or self.cooldown_s <= 0:
            raise ValueError(f"GuardPolicy needs strikes >= 0 and positive window_s and cooldown_s, got {self}")


@dataclass(slots=True)
class _Record:
    strikes: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0


class PeerGuard:
    """Counts strikes per peer host and says who is cooling down; one per server (or wire)."""

    def __init__(self, policy: GuardPolicy | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or GuardPolicy()
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def cooling_down(self, host: str) -> float:
        """Seconds of cool-down left for ``host`` (0.0: its calls are served)."""
        record = self._records.get(host)
        if record is None:
            return 0.0
        return max(0.0, record.banned_until - self._clock())

    def strike(self, host: str) -> bool:
        """Record one strike; True when it starts a cool-down (the caller logs that once)."""
        if not self.policy.strikes:
            return False
        now = self._clock()
        record = self._records.get(host)
        if record is None:
            if len(self._records) >= MAX_PEERS:
                self._prune(now)
            record = self._records[host] = _Record()
        if record.banned_until > now:
            return False
        record.strikes.append(now)
        while record.strikes and record.strikes[0] <= now - self.policy.window_s:
            record.strikes.popleft()
        if len(record.strikes) < self.policy.strikes:
            return False
        record.strikes.clear()
        record.banned_until = now + self.policy.cooldown_s
        return True

    def _prune(self, now: float) -> None:
        """Forget peers with no recent strike and no cool-down; if all are live, the oldest half."""
        horizon = now - self.policy.window_s
        for host in [h for h, r in self._records.items()
                     if r.banned_until <= now and (not r.strikes or r.strikes[-1] <= horizon)]:
            del self._records[host]
        if len(self._records) >= MAX_PEERS:
            for host in list(self._records)[:MAX_PEERS // 2]:
                del self._records[host]


class PeerLog:
    """One warning line per peer per ``interval_s`` seconds; the next line says how many were suppressed.

    Bad input is never logged with a traceback: the line names the peer, what it called and why it
    was refused, which is all an operator can act on."""

    def __init__(self, log: logging.Logger = logger, *, interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}   # host -> (time of its last line, lines suppressed since)

    def warning(self, host: str, message: str, *args: object, always: bool = False) -> None:
        """Log ``message % args`` unless ``host`` had a line in the last interval; ``always``: log it anyway
        (a cool-down starting: rare by itself, and what an operator must see)."""
        now = self._clock()
        last = self._last.get(host)
        if last is not None and now - last[0] < self._interval_s and not always:
            self._last[host] = (last[0], last[1] + 1)
            return
        if len(self._last) >= MAX_PEERS:
            self._last = {h: v for h, v in self._last.items() if now - v[0] < self._interval_s}
            if len(self._last) >= MAX_PEERS:
                self._last.clear()
        suppressed = last[1] if last is not None else 0
        more = f" ({suppressed} more from this peer in the last {now - last[0]:.0f} s)" if last and suppressed else ""
        self._log.warning(message + "%s", *args, more)
        self._last[host] = (now, 0)


BAD_INPUT_LOG = PeerLog()   # shared by everything that refuses a peer's input in this process
