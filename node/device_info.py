"""What a node tells the coordinator about its device when it joins: relative speed and memory."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from lowband.node.train.model import ModelConfig, build_stage

# cgroup limits a container may set below the host's RAM (v2, then v1; absent or "max": no limit)
CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


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
    """Memory a stage can use on ``device``: a CUDA device's total memory, else the host's RAM, capped
    by the container's cgroup limit (CPU and MPS stages live in host memory). Total, not free: the
    node is about to fill it with its stage, and the number must not drift with whatever else runs
    at join time. 0 when the platform does not say."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # no sysconf names on this platform
        return 0
    for path in CGROUP_LIMIT_FILES:
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(path.read_text().strip()))
    return max(0, total)
