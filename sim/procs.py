"""Child-process supervision for the simulator: no orphans, ever.

Every child starts in its own session (hence its own process group), so a
whole subtree can be signalled with ``killpg``. The supervisor kills every
group it started on every exit path: normal return, exception, SIGINT/SIGTERM
(handled by the caller turning them into ``KeyboardInterrupt``/``SystemExit``)
and interpreter exit (``atexit``). Groups are tracked by pid so only our own
processes are ever signalled. Children start and stop with the process-group
helpers of ``lowband.coordinator.launch``; a coordinator its launcher started is
adopted (``Supervisor.adopt``).
"""

from __future__ import annotations

import atexit
import logging
import random
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lowband.coordinator.launch import signal_group, start_in_session, stop_group

logger = logging.getLogger(__name__)


_port_rng = random.SystemRandom()   # not a run's seeded generator: port choice must not shift a run


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that is free now, for a process that binds it seconds later (after importing torch).

    Chosen below the kernel's ephemeral range: a port from that range can be taken meanwhile by any
    outgoing connection or port-0 listener on the machine (it happened in CI: a simulated node then
    failed to bind and the run never had that stage)."""
    low = _ephemeral_low()
    for _ in range(64):
        port = _port_rng.randint(max(1024, low - 12000), max(1025, low - 1))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_bytes(pid: int) -> int:
    """A live process's peak resident memory (VmHWM), 0 when it cannot be read (gone, not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Child:
    """One supervised OS process (the leader of its own process group)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        """Signal the child's whole process group; a group already gone is fine."""
        signal_group(self.popen.pid, sig)


class Supervisor:
    """Starts children in their own process groups and guarantees they die with us."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self._closed = False
        atexit.register(self.kill_all)

    def log_path(self, name: str) -> Path:
        """Where the child called ``name`` logs (stdout and stderr)."""
        return self.log_dir / f"{name}.log"

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Child:
        popen = start_in_session(argv, self.log_path(name), env=env, cwd=cwd)
        logger.debug("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return self.adopt(name, popen)

    def adopt(self, name: str, popen: subprocess.Popen) -> Child:
        """Supervise a child started elsewhere in its own session and logging to ``log_path(name)``
        (a coordinator from ``lowband.coordinator.launch``)."""
        child = Child(name=name, popen=popen, log_path=self.log_path(name))
        self.children.append(child)
        return child

    def live(self) -> list[Child]:
        return [c for c in self.children if c.alive()]

    def stop(self, child: Child, *, graceful: bool, timeout_s: float = 5.0) -> None:
        """SIGTERM (graceful) or SIGKILL a child's group; escalate to SIGKILL on timeout."""
        if child.alive():
            stop_group(child.popen, graceful=graceful, timeout_s=timeout_s)

    def kill_all(self, graceful_s: float = 3.0) -> None:
        """Terminate every group we started: SIGTERM, short grace, then SIGKILL."""
        if self._closed:
            return
        self._closed = True
        live = self.live()
        for child in live:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + graceful_s
        for child in live:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                child.popen.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            child.signal_group(signal.SIGKILL)
            try:
                child.popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                logger.error("process %s (pid %d) did not die", child.name, child.pid)
        atexit.unregister(self.kill_all)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()
