"""The supervisor leaves no process behind: children, their grandchildren, on every exit path."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from lowband.coordinator.launch import start_in_session
from lowband.sim.procs import Supervisor

# A child that starts a grandchild (same process group) and ignores SIGTERM, like a stuck node.
STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(g.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _grandchild_pid(log_path, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text().strip()
        if text:
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError("child never reported its grandchild")


def test_kill_all_reaches_stubborn_children_and_grandchildren(tmp_path) -> None:
    sup = Supervisor(tmp_path)
    child = sup.spawn("stubborn", [sys.executable, "-c", STUBBORN])
    grandchild = _grandchild_pid(child.log_path)
    assert os.getpgid(child.pid) == child.pid  # its own group, not ours
    assert os.getpgid(child.pid) != os.getpgid(0)
    sup.kill_all(graceful_s=0.5)
    assert not child.alive()
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_context_manager_cleans_up_on_exception(tmp_path) -> None:
    with pytest.raises(RuntimeError), Supervisor(tmp_path) as sup:
        child = sup.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        raise RuntimeError("boom")
    assert not child.alive()


def test_stop_graceful_then_forced(tmp_path) -> None:
    sup = Supervisor(tmp_path)
    polite = sup.spawn("polite", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup.stop(polite, graceful=True, timeout_s=5)
    assert polite.popen.returncode == -signal.SIGTERM
    stubborn = sup.spawn("stubborn", [sys.executable, "-c", STUBBORN])
    _grandchild_pid(stubborn.log_path)
    sup.stop(stubborn, graceful=True, timeout_s=0.5)
    assert stubborn.popen.returncode == -signal.SIGKILL
    sup.kill_all()


def test_an_adopted_child_is_ended_like_a_spawned_one(tmp_path) -> None:
    sup = Supervisor(tmp_path)
    popen = start_in_session([sys.executable, "-c", "import time; time.sleep(60)"], sup.log_path("adopted"))
    child = sup.adopt("adopted", popen)
    assert os.getpgid(child.pid) == child.pid and child.log_path == tmp_path / "adopted.log"
    sup.kill_all(graceful_s=0.5)
    assert not child.alive()
