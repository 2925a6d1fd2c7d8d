"""The node daemon as a process: waits out a coordinator that is not up yet, leaves cleanly on SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from node_procs import LocalRun

from lowband.node.coordinator_client import Backoff
from lowband.sim.procs import free_port


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[0] <= 0.125 and delays[1] > delays[0] * 1.1   # doubles (with +-25% jitter)
    assert max(delays) <= 1.25 and delays[-1] >= 0.75           # capped at max_s (+-25%)
    backoff.reset()
    assert backoff.next_delay() <= 0.125


def test_node_waits_for_coordinator_then_leaves_on_sigterm(tmp_path: Path) -> None:
    run = LocalRun(tmp_path, ["model.stages=2", "membership.heartbeat_interval_s=0.5", "membership.lease_s=5"])
    try:
        port = free_port()
        run.address = f"127.0.0.1:{port}"
        node = run.start_node("node", preferred_stage=0)
        log = tmp_path / "node.log"
        deadline = time.monotonic() + 60
        while "retrying" not in log.read_text():   # no coordinator yet: the node retries, does not exit
            assert time.monotonic() < deadline and node.poll() is None, run.tail()
            time.sleep(0.1)
        time.sleep(1.0)
        assert node.poll() is None, run.tail()
        run.start_coordinator(bind=f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not run.records(0, "schedule"):
            assert time.monotonic() < deadline and node.poll() is None, run.tail()
            time.sleep(0.1)
        node.send_signal(signal.SIGTERM)
        assert run.wait_nodes(timeout_s=15) == [0], run.tail()
        leave = run.records(0, "leave")
        assert leave and leave[0]["acknowledged"] is True and "SIGTERM" in leave[0]["reason"]
        assert "event leave" in (tmp_path / "coordinator.log").read_text()
    finally:
        run.close()


def test_microbatches_naming_unknown_peers_share_one_schedule_reload_and_wait_for_it() -> None:
    """Many microbatches naming a peer we do not know (a node that just moved stages has no schedule yet)
    trigger one reload, and those that arrive while it is under way wait for it instead of going on
    without the address (they would give up their microbatch without telling its origin)."""
    import asyncio
    from types import SimpleNamespace

    from lowband.node.daemon import NodeDaemon

    async def main() -> tuple[list[bool], int]:
        reloads: list[float] = []
        have_schedule = asyncio.Event()
        fake = SimpleNamespace(_schedule_lock=asyncio.Lock(), _last_refresh=0.0)

        async def reload() -> None:   # what _reload_schedule does: fetch under the lock, then stamp
            async with fake._schedule_lock:
                reloads.append(time.monotonic())
                await asyncio.sleep(0.1)
                have_schedule.set()
                fake._last_refresh = time.monotonic()

        fake._reload_schedule = reload

        async def microbatch() -> bool:
            await NodeDaemon._refresh_for_unknown_peer(fake)  # type: ignore[arg-type]
            return have_schedule.is_set()

        first = await asyncio.gather(*(microbatch() for _ in range(5)))
        await asyncio.sleep(0.3)
        await microbatch()   # later: the schedule may have changed again
        return first, len(reloads)

    first, reloads = asyncio.run(main())
    assert all(first)    # nobody went on before the schedule was in
    assert reloads == 2  # one for the five at once, one for the later one
