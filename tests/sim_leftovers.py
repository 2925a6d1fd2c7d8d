"""Find (and end) processes a simulator run left behind: every child names the run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def leftovers(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def kill_leftovers(marker: str) -> None:
    for pid in leftovers(marker):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def reap(proc: subprocess.Popen, marker: str) -> list[int]:
    """Kill `proc`'s group if it still runs, then return (and kill) whatever named `marker` survived."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    left = leftovers(marker)
    kill_leftovers(marker)
    return left
