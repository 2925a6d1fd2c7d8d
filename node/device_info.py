"""What a node tells the coordinator about its device when it joins: relative speed and free memory."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from lowband.node.train.model import ModelConfig, build_stage

# a container's memory limit and its current usage (cgroup v2, then v1; absent or "max": no limit)
CGROUP_FILES = (
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
)
MEMINFO = Path("/proc/meminfo")


def measure_throughput(device: torch.device, slowdown: float = 1.0, reps: int = 3) -> float:
    """Samples/s of forward+backward through one tiny block: a relative speed for stage assignment."""
    cfg = ModelConfig.from_preset("tiny")
    stage = build_stage(cfg, 1, cfg.n_layers + 1, seed=0).to(device)   # one block per stage
    x = torch.randn(4, 64, cfg.dim, device=device)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-6)   # warms up torch.optim's lazy imports too
    stage(x).sum().backward()
    optimizer.step()
    start = time.perf_counter()
    for _ in range(reps):
        stage(x).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * slowdown
    return max(1e-3, reps * x.shape[0] / elapsed)


def device_memory_bytes(device: torch.device) -> int:
    """Free memory a stage can use on ``device``, measured now (the node reports it at join, before it
    builds its stage): a CUDA device's free memory (``mem_get_info``: what other processes, such as
    other simulated nodes on the same GPU, hold is already taken), else the host's available memory
    (CPU and MPS stages live there), capped by what the container's cgroup has left. 0 when the platform
    does not say (the coordinator then assumes the node fits)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = host_available_bytes()
    room = cgroup_room_bytes()
    if room is not None:
        available = min(available, room) if available else room
    return max(0, available)


def host_available_bytes(meminfo: Path = MEMINFO) -> int:
    """The kernel's estimate of memory available without swapping (``MemAvailable``), 0 when unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024   # kB
    return 0


def cgroup_room_bytes(limits: tuple[tuple[Path, Path], ...] = CGROUP_FILES) -> int | None:
    """What the container's memory limit leaves (limit - current usage), None without a limit."""
    for limit_path, usage_path in limits:
        try:
            limit_text = limit_path.read_text().strip()
        except OSError:
            continue
        if limit_text == "max":
            return None
        try:
            limit = int(limit_text)
            usage = int(usage_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:   # cgroup v1's "no limit" is a huge number
            return None
        return max(0, limit - usage)
    return None
