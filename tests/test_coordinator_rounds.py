"""Sync-round quorum state machine with a fake clock: fast path, window, timeout, monotonic ids."""

from __future__ import annotations

import pytest
from fake_clock import Clock

from lowband.coordinator import validate
from lowband.coordinator.errors import InvalidRequest
from lowband.coordinator.rounds import FormedRound, SyncRounds
from lowband.protocols import coordinator_pb2 as pb


def make(window: float = 2.0, minimum: int = 1, timeout: float = 10.0) -> tuple[SyncRounds, Clock]:
    clock = Clock(100.0)
    return SyncRounds(window, minimum, timeout, clock), clock


def test_forms_at_once_when_every_healthy_replica_asked() -> None:
    rounds, _ = make()
    healthy = ["a", "b", "c"]
    assert not rounds.request("b", 1, 0, 5, healthy).ready
    assert not rounds.request("a", 1, 0, 5, healthy).ready
    s = rounds.request("c", 1, 0, 5, healthy)
    assert s.ready and s.participants == ("a", "b", "c") and s.outer_step == 5
    again = rounds.request("a", 1, 0, 5, healthy)
    assert again.ready and again.round_id == s.round_id and again.participants == s.participants


def test_window_then_forms_with_whoever_asked() -> None:
    rounds, clock = make(window=2.0)
    healthy = ["a", "b", "c"]
    s = rounds.request("a", 1, 0, 1, healthy)
    assert not s.ready and 0 < s.retry_after_s <= 2.0
    rounds.request("b", 1, 0, 1, healthy)
    clock.t += 1.0
    assert not rounds.request("a", 1, 0, 1, healthy).ready
    clock.t += 1.01
    s = rounds.request("a", 1, 0, 1, healthy)
    assert s.ready and s.participants == ("a", "b")
    late = rounds.request("c", 1, 0, 1, healthy)
    assert late.ready and "c" not in late.participants and late.round_id == s.round_id


def test_fast_path_when_previous_participants_are_back() -> None:
    rounds, _ = make(window=5.0)
    everyone = ["a", "b", "c"]
    for node in everyone:
        rounds.request(node, 2, 0, 1, everyone)
    # c dies; a and b, the rest of the previous (whole-stage) group, are back: no waiting
    assert not rounds.request("a", 2, 0, 2, ["a", "b"]).ready
    s = rounds.request("b", 2, 0, 2, ["a", "b"])
    assert s.ready and s.participants == ("a", "b")


def test_round_that_left_someone_out_is_followed_by_a_window() -> None:
    rounds, clock = make(window=5.0)
    healthy = ["a", "b"]
    rounds.request("a", 1, 0, 1, healthy)
    clock.t += 5.01
    assert rounds.request("a", 1, 0, 1, healthy).participants == ("a",)  # b was late
    # a alone must not form the next round at once: b is waited for, and takes part
    assert not rounds.request("a", 1, 0, 2, healthy).ready
    clock.t += 1.0
    s = rounds.request("b", 1, 0, 2, healthy)
    assert s.ready and s.participants == ("a", "b")


def test_a_replica_the_plan_leaves_idle_is_not_waited_for_but_may_take_part() -> None:
    rounds, clock = make(window=5.0)
    healthy, scheduled = ["a", "b", "idle"], ["a", "b"]
    assert not rounds.request("a", 1, 0, 1, healthy, scheduled).ready
    s = rounds.request("b", 1, 0, 1, healthy, scheduled)
    assert s.ready and s.participants == ("a", "b")            # no join window spent on "idle"
    # the next rounds take the fast path too: leaving out a replica nobody waits for is no gap
    assert not rounds.request("b", 1, 0, 2, healthy, scheduled).ready
    assert rounds.request("a", 1, 0, 2, healthy, scheduled).participants == ("a", "b")
    # a replica outside the plan that does ask (it still had steps of an older plan) takes part
    rounds.request("idle", 1, 0, 3, healthy, scheduled)
    rounds.request("a", 1, 0, 3, healthy, scheduled)
    assert rounds.request("b", 1, 0, 3, healthy, scheduled).participants == ("a", "b", "idle")
    # without the plan's word every healthy replica is waited for, as before
    assert not rounds.request("a", 1, 0, 4, healthy).ready
    assert not rounds.request("b", 1, 0, 4, healthy).ready
    clock.t += 5.01
    assert rounds.request("a", 1, 0, 4, healthy).participants == ("a", "b")


def test_dead_previous_participant_does_not_block_fast_path() -> None:
    rounds, _ = make(window=5.0)
    for node in ("a", "b"):
        rounds.request(node, 1, 0, 1, ["a", "b"])
    # b died: a alone is the whole stage now
    s = rounds.request("a", 1, 0, 2, ["a"])
    assert s.ready and s.participants == ("a",)


def test_newcomer_is_waited_for_once_then_takes_part() -> None:
    rounds, clock = make(window=5.0)
    first = rounds.request("a", 1, 0, 1, ["a"])
    assert first.ready and first.participants == ("a",)
    # b joined the stage: a alone must not form the next round at once
    assert not rounds.request("a", 1, 0, 2, ["a", "b"]).ready
    clock.t += 1.0
    s = rounds.request("b", 1, 0, 2, ["a", "b"])
    assert s.ready and s.participants == ("a", "b")
    # and from then on the round needs both
    assert not rounds.request("a", 1, 0, 3, ["a", "b"]).ready
    assert rounds.request("b", 1, 0, 3, ["a", "b"]).participants == ("a", "b")
    # a newcomer that never shows up costs one window, not the round
    assert not rounds.request("a", 1, 0, 4, ["a", "b", "c"]).ready
    rounds.request("b", 1, 0, 4, ["a", "b", "c"])
    clock.t += 5.01
    assert rounds.request("a", 1, 0, 4, ["a", "b", "c"]).participants == ("a", "b")


def test_minimum_not_reached_waits_then_abandons_at_timeout() -> None:
    rounds, clock = make(window=1.0, minimum=2, timeout=3.0)
    healthy = ["a", "b"]
    assert not rounds.request("a", 1, 0, 1, healthy).ready
    clock.t += 1.5  # past the window, still one short
    s = rounds.request("a", 1, 0, 1, healthy)
    assert not s.ready and not s.abandoned and s.retry_after_s > 0
    clock.t += 2.0  # past the timeout
    s = rounds.request("a", 1, 0, 1, healthy)
    assert s.abandoned and not s.ready and "quorum not reached" in s.reason
    assert rounds.request("b", 1, 0, 1, healthy).abandoned  # the round stays abandoned


def test_unhealthy_askers_are_not_participants() -> None:
    rounds2, clock2 = make(window=1.0)
    rounds2.request("a", 1, 0, 1, ["a", "b", "c"])
    rounds2.request("b", 1, 0, 1, ["a", "b", "c"])
    clock2.t += 1.5
    s = rounds2.request("a", 1, 0, 1, ["a", "c"])  # b died in the meantime
    assert s.participants == ("a",)


def test_round_ids_monotonic_per_key_and_keys_independent() -> None:
    rounds, _ = make()
    ids = []
    for step in range(1, 6):
        ids.append(rounds.request("a", 1, 0, step, ["a"]).round_id)
    assert ids == sorted(ids) and len(set(ids)) == 5
    other = rounds.request("a", 1, 1, 1, ["a"])
    assert other.ready and other.round_id == 1
    assert rounds.max_outer_step() == 5


def test_stale_outer_step_is_abandoned() -> None:
    rounds, _ = make()
    for step in range(1, 12):  # more than the retained history
        rounds.request("a", 1, 0, step, ["a"])
    s = rounds.request("a", 1, 0, 1, ["a"])
    assert s.abandoned and "stale" in s.reason


def test_restore_continues_ids_and_answers_formed_round() -> None:
    rounds, _ = make()
    rounds.restore([FormedRound(1, 0, 7, 40, ("a", "b"))])
    late = rounds.request("b", 1, 0, 40, ["a", "b"])
    assert late.ready and late.round_id == 7 and late.participants == ("a", "b")
    nxt = rounds.request("a", 1, 0, 41, ["a", "b"])
    assert nxt.round_id == 8
    assert rounds.request("a", 1, 0, 39, ["a", "b"]).abandoned


def test_a_rebuilt_stage_is_told_to_continue_the_round_numbering_only_when_its_lineage_died() -> None:
    rounds, _ = make()
    for step in range(1, 6):
        assert rounds.request("old", 1, 0, step, ["old"]).ready
    # A newcomer asks for a past round while a replica that took part is alive: it must copy that
    # replica's outer state, so no adopt hint (a hint would let it skip the group's θ_global).
    behind = rounds.request("new", 1, 0, 1, ["old", "new"])
    assert behind.ready and "new" not in behind.participants and behind.adopt_outer_step == 0
    # Every replica that took part is gone (the stage was rebuilt): continue from outer step 5.
    orphan = rounds.request("new", 1, 0, 1, ["new", "new2"])
    assert orphan.ready and "new" not in orphan.participants and orphan.adopt_outer_step == 5
    for step in range(6, 12):   # the history is trimmed: the asked step is stale, same hint
        rounds.request("old", 1, 0, step, ["old"])
    stale = rounds.request("new", 1, 0, 1, ["new"])
    assert stale.abandoned and "stale" in stale.reason and stale.adopt_outer_step == 11
    # The rebuilt replicas continue together from there.
    nxt = [rounds.request(n, 1, 0, 12, ["new", "new2"]) for n in ("new", "new2")]
    assert nxt[1].ready and nxt[1].participants == ("new", "new2")
    assert rounds.request("new", 1, 0, 12, ["new", "new2"]).adopt_outer_step == 0


def test_a_participant_gets_no_adopt_hint() -> None:
    rounds, _ = make()
    s = rounds.request("a", 1, 0, 1, ["a"])
    assert s.ready and s.participants == ("a",) and s.adopt_outer_step == 0


def test_a_formed_round_carries_each_participants_latest_dht_maddrs() -> None:
    rounds, _ = make()
    healthy = ["a", "b", "c"]
    rounds.request("b", 1, 0, 1, healthy, maddrs=["/ip4/10.0.0.2/tcp/1/p2p/B"])
    rounds.request("a", 1, 0, 1, healthy, maddrs=["/ip4/10.0.0.1/tcp/9/p2p/A"])   # an earlier DHT of a
    rounds.request("a", 1, 0, 1, healthy, maddrs=["/ip4/10.0.0.1/tcp/1/p2p/A"])
    s = rounds.request("c", 1, 0, 1, healthy)   # grpc-style caller: no maddrs
    assert s.participants == ("a", "b", "c")
    assert s.maddrs == (("/ip4/10.0.0.1/tcp/1/p2p/A",), ("/ip4/10.0.0.2/tcp/1/p2p/B",), ())
    assert not rounds.request("a", 1, 0, 2, healthy).maddrs   # not formed yet: nobody to connect to
    # b died: its maddrs are forgotten (the table is bounded by the stage's healthy replicas)
    rounds.request("a", 1, 1, 1, ["a", "c"], maddrs=["/ip4/10.0.0.1/tcp/1/p2p/A"])
    s = rounds.request("c", 1, 1, 1, ["a", "c"])
    assert s.participants == ("a", "c") and s.maddrs == (("/ip4/10.0.0.1/tcp/1/p2p/A",), ())
    assert "b" not in rounds._maddrs[1]


def request(maddrs: list[str]) -> pb.SyncRoundRequest:
    return pb.SyncRoundRequest(node_id="a", stage=0, fragment=0, outer_step=1, sync_maddrs=maddrs)


def test_sync_maddrs_are_bounded() -> None:
    validate.sync_round(request(["/ip4/10.0.0.1/tcp/4001/p2p/QmPeer"] * validate.MAX_SYNC_MADDRS), 2, 1)
    for bad, why in ([["/ip4/1/tcp/1"] * (validate.MAX_SYNC_MADDRS + 1), "at most"],
                     [["/" + "x" * validate.MAX_MADDR], "longer than"],
                     [[""], "empty"], [["10.0.0.1:4001"], "not a multiaddr"],
                     [["/ip4/1 /tcp/1"], "not a multiaddr"], [["/ip4/1\n"], "not a multiaddr"]):
        with pytest.raises(InvalidRequest, match=why):
            validate.sync_round(request(bad), 2, 1)
