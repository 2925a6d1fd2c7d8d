"""Strikes, cool-downs and rate-limited bad-input lines (protocols/peer_guard.py), on a fake clock."""

from __future__ import annotations

import logging

import pytest
from fake_clock import Clock

from lowband.protocols.peer_guard import MAX_PEERS, GuardPolicy, PeerGuard, PeerLog, peer_host


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:127.0.0.1:5555", "127.0.0.1"), ("ipv6:[::1]:80", "::1"), ("ipv6:[fe80::1%eth0]:9", "fe80::1%eth0"),
    ("unix:/tmp/x.sock", "unix:/tmp/x.sock"), ("10.0.0.2:7000", "10.0.0.2"), ("[::1]:9", "::1"), ("", "")])
def test_peer_host_drops_the_port_so_a_reconnect_is_the_same_peer(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_strikes_within_the_window_start_a_cool_down_that_ends() -> None:
    clock = Clock(100.0)
    guard = PeerGuard(GuardPolicy(strikes=3, window_s=10.0, cooldown_s=30.0), clock=clock)
    assert not guard.strike("a") and not guard.strike("a")
    assert guard.cooling_down("a") == 0.0
    assert guard.strike("a")                       # the third within 10 s
    assert guard.cooling_down("a") == pytest.approx(30.0)
    assert guard.cooling_down("b") == 0.0          # per host
    assert not guard.strike("a")                   # strikes while cooling down neither count nor extend it
    clock.t += 30.0
    assert guard.cooling_down("a") == 0.0
    assert not guard.strike("a")                   # the count starts afresh


def test_strikes_spread_wider_than_the_window_never_cool_down() -> None:
    clock = Clock(100.0)
    guard = PeerGuard(GuardPolicy(strikes=3, window_s=10.0, cooldown_s=30.0), clock=clock)
    for _ in range(20):
        assert not guard.strike("a")
        clock.t += 5.1
    assert guard.cooling_down("a") == 0.0


def test_zero_strikes_never_cools_down_and_bad_policies_are_refused() -> None:
    guard = PeerGuard(GuardPolicy(strikes=0))
    assert not any(guard.strike("a") for _ in range(1000))
    with pytest.raises(ValueError, match="strikes"):
        GuardPolicy(strikes=-1)
    with pytest.raises(ValueError, match="cooldown_s"):
        GuardPolicy(cooldown_s=0)


def test_a_flood_from_many_hosts_keeps_the_table_bounded() -> None:
    clock = Clock(100.0)
    guard = PeerGuard(GuardPolicy(strikes=1, window_s=1.0, cooldown_s=1000.0), clock=clock)
    assert guard.strike("attacker")
    clock.t += 2.0
    hosts = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(3 * MAX_PEERS)]
    for host in hosts:
        assert guard.strike(host)
        clock.t += 0.001
    assert len(guard._records) <= MAX_PEERS
    assert guard.cooling_down(hosts[-1]) > 0       # when all are live, the oldest half goes, not the newest


def test_peer_log_writes_one_line_per_host_per_interval_and_counts_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(100.0)
    log = PeerLog(logging.getLogger("peer-log-test"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="peer-log-test"):
        for _ in range(100):
            log.warning("a", "bad input from %s", "a")
            log.warning("b", "bad input from %s", "b")
        log.warning("a", "cool-down for %s", "a", always=True)
        clock.t += 10.0
        log.warning("a", "bad input from %s", "a")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["bad input from a", "bad input from b", "cool-down for a (99 more from this peer in the last 0 s)"]
    assert lines[3] == "bad input from a"
    assert len(lines) == 4
