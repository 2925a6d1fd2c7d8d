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

import torch

from lowband.coordinator.launch import signal_group, start_in_session, stop_group
from lowband.protocols.config import RunConfig
from lowband.protocols.stage_memory import microbatch_activation_bytes, stage_state_bytes, uses_bf16

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


# ---- device placement --------------------------------------------------------------------------

# Per node process on a GPU beyond its stage: the CUDA context, cuBLAS workspaces and the caching
# allocator's slack (a few hundred MiB each on current drivers).
CUDA_PROCESS_OVERHEAD_BYTES = 768 << 20


class PlacementError(RuntimeError):
    """The nodes do not fit on the visible devices' memory."""


@dataclass(frozen=True, slots=True)
class DeviceRoom:
    """A device node processes may go to, with the memory free on it before any node started."""

    name: str          # "cuda:0", ...
    free_bytes: int


def visible_cuda_devices() -> list[DeviceRoom]:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies) and their free memory; empty
    without CUDA. Initialises CUDA in the simulator's own process (one context per device)."""
    if not torch.cuda.is_available():
        return []
    return [DeviceRoom(f"cuda:{i}", int(torch.cuda.mem_get_info(i)[0])) for i in range(torch.cuda.device_count())]


def node_need_bytes(run: RunConfig, stage: int, *, origins: int, replicas: int, device: str = "cuda") -> int:
    """GPU memory one node process of ``stage`` needs: its stage's state, the activations of the most
    microbatches it holds at once (its share of the iteration's, an origin's own at least) and the
    process's CUDA overhead (protocols/stage_memory.py estimates on the high side)."""
    per_iteration = origins * run.train.microbatches
    held = run.train.microbatches if stage == 0 else max(run.train.microbatches, -(-per_iteration // max(1, replicas)))
    bf16 = uses_bf16(run.train.precision, device)
    return (stage_state_bytes(run, stage) + held * microbatch_activation_bytes(run, stage, bf16=bf16)
            + CUDA_PROCESS_OVERHEAD_BYTES)


def choose_device(devices: Sequence[DeviceRoom], placed: Sequence[tuple[str, int]], need: int, start: int) -> str:
    """The device a new node process goes to: round-robin from ``devices[start % n]``, skipping a device
    whose free memory less what ``placed`` (device, need of each live node on it) holds is below
    ``need``; "cpu" when there are no devices. Raises PlacementError when no device has room (pure)."""
    if not devices:
        return "cpu"
    used: dict[str, int] = {}
    for name, bytes_ in placed:
        used[name] = used.get(name, 0) + bytes_
    n = len(devices)
    for k in range(n):
        device = devices[(start + k) % n]
        if device.free_bytes - used.get(device.name, 0) >= need:
            return device.name
    rooms = ", ".join(f"{d.name} {max(0, d.free_bytes - used.get(d.name, 0)) / 2**30:.1f} GiB left"
                      for d in devices)
    raise PlacementError(f"no visible CUDA device has room for another node needing {need / 2**30:.2f} GiB "
                         f"({rooms}): run fewer nodes (sim.origins, sim.replicas_per_stage), a smaller "
                         f"model, or sim.device = \"cpu\"")


def place_nodes(devices: Sequence[DeviceRoom], needs: Sequence[int]) -> list[str]:
    """The device of each node in order (round-robin over ``devices``, capped by memory); see
    ``choose_device``. Raises PlacementError naming what does not fit."""
    placed: list[tuple[str, int]] = []
    out = []
    for i, need in enumerate(needs):
        name = choose_device(devices, placed, need, i)
        placed.append((name, need))
        out.append(name)
    return out
