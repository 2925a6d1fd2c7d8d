"""`lowband-coordinator export` of a live multi-process run: the file holds, tensor for tensor, the
θ_global its replicas hold, loads strictly (a subspace model's anchors included), and `lowband-sim
eval` and `generate` run on it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from node_procs import TOKEN, LocalRun

from lowband.coordinator.cli import fetch_status
from lowband.coordinator.export import ExportResult, StageCopy, export_live, fetch_stage
from lowband.node.train.export import load_model
from lowband.protocols.rpc import token_metadata

OVERRIDES = [
    "model.stages=2", "model.seq_len=32", "model.subspace_rank=8", "train.microbatch_size=2",
    "train.microbatches=1", "train.steps=100000", "train.eval_every=100000", "train.eval_batches=1",
    "diloco.inner_steps=8", "diloco.fragments=2", "diloco.codec=int8",
    "membership.heartbeat_interval_s=0.5", "membership.lease_s=5",
    "membership.sync_join_window_s=6", "membership.sync_timeout_s=12",
]
ATTEMPTS = 30   # the run keeps training: an export and the replicas' own copies must land in one round
SLOWDOWN = ["--slowdown", "8"]   # a fragment merges every few seconds, not several times a second


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


async def _export_then_replicas(run: LocalRun, out: Path) -> tuple[ExportResult, list[StageCopy]]:
    """An export and, right after it, every live replica's own θ_global (tens of milliseconds apart)."""
    result = await export_live(run.address, TOKEN, out)
    status = fetch_status(run.address, TOKEN)
    live = [n for n in status.nodes if n.state == "alive"]
    return result, [await fetch_stage(n.address, n.stage, n.node_id, token_metadata(TOKEN)) for n in live]


def _wait_for(run: LocalRun, index: int, kind: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(run.records(index, kind)) < count:
        assert time.monotonic() < deadline, run.tail()
        assert all(p.poll() is None for p in run.nodes), run.tail()
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_export_of_a_live_run_is_the_theta_global_its_replicas_hold(tmp_path: Path,
                                                                      local_run: Callable[..., LocalRun]) -> None:
    run = local_run(OVERRIDES)
    run.start_node("origin", preferred_stage=0, extra=SLOWDOWN)
    run.start_node("a", preferred_stage=1, extra=SLOWDOWN)
    run.start_node("b", preferred_stage=1, extra=SLOWDOWN)
    _wait_for(run, 0, "outer-sync", 4, timeout_s=150)   # both fragments merged twice
    for index in (1, 2):   # one stage-1 replica trains, the other may be an idle follower of its group
        _wait_for(run, index, "stage", 1, timeout_s=60)

    out = tmp_path / "model.pt"
    matched: dict[str, int] = {}
    for _ in range(ATTEMPTS):
        result, replicas = asyncio.run(_export_then_replicas(run, out))
        exported = torch.load(out, weights_only=True)
        matched = {}
        for copy in replicas:
            if copy.outer_steps != result.outer_steps[copy.stage]:
                continue   # the replica merged another round since the export: compare the next pair
            stage_state = exported["stages"][copy.stage]
            assert set(copy.theta_global) <= set(stage_state)
            for name, tensor in copy.theta_global.items():
                assert torch.equal(stage_state[name], tensor), f"{copy.node_id} {name}"
            matched[copy.node_id] = copy.stage
        if sorted(matched.values()) == [0, 1, 1]:
            break
        time.sleep(0.3)
    assert sorted(matched.values()) == [0, 1, 1], f"no export landed in one round with every replica: {matched}"
    assert all(v >= 1 for v in result.outer_steps[1].values()), result   # θ_global has moved from the init
    assert exported["meta"]["sources"]["1"] in matched

    # the command a user runs: same file format, a line per stage, and the file it names
    cli = _cli("-m", "lowband.coordinator.cli", "export", "--coordinator", run.address,
               "--token-file", str(run.token_file), "--out", str(out))
    assert cli.returncode == 0 and f"wrote {out}" in cli.stdout, cli.stderr
    assert "embed.anchors" in exported["stages"][0]

    model = load_model(out)   # strict load: every parameter and buffer present
    assert model.num_stages == 2 and model.config.subspace_rank == 8
    evaluated = _cli("-m", "lowband.sim.cli", "eval", "--model", str(out), "--batches", "1", "--batch-size", "2",
                     "--seq-len", "32", "--threads", "1", "--json", "--max-bytes", "200000")
    assert evaluated.returncode == 0, evaluated.stderr
    generated = _cli("-m", "lowband.sim.cli", "generate", "--model", str(out), "--prompt", "def ", "--tokens", "16",
                     "--threads", "1")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("def ") and len(generated.stdout) > len("def ")
