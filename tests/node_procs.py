"""Multi-process runs for node tests: a coordinator and node daemons as real processes on loopback.

The processes are the simulator's supervised children (``lowband.sim.procs.Supervisor``): each runs in its
own session (process group), and ``LocalRun.close`` kills every group it started, so a failing test
leaves no processes behind.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lowband.coordinator.launch import CoordinatorProcess, launch_coordinator
from lowband.sim.procs import Supervisor

TOKEN = "node-test-token"


class LocalRun:
    def __init__(self, workdir: Path, overrides: list[str]) -> None:
        self.workdir = workdir
        self.overrides = overrides
        self.token_file = workdir / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.supervisor = Supervisor(workdir)
        self.coordinator: CoordinatorProcess | None = None
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.address = ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = "1"
        env.pop("LOWBAND_TOKEN", None)
        return env

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        return self.supervisor.spawn(name, args, env=self._env(), cwd=self.workdir).popen

    def start_coordinator(self, timeout_s: float = 30.0, bind: str = "127.0.0.1:0") -> str:
        process = launch_coordinator(self.workdir / "run", log_path=self.supervisor.log_path("coordinator"),
                                     bind=bind, token_file=self.token_file, overrides=self.overrides,
                                     env=self._env(), cwd=self.workdir, timeout_s=timeout_s)
        self.supervisor.adopt("coordinator", process.popen)
        self.coordinator = process
        self.address = process.address
        return self.address

    def start_node(self, name: str, preferred_stage: int = -1, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        log_json = self.workdir / f"{name}.jsonl"
        args = [sys.executable, "-m", "lowband.node.cli", "--coordinator", self.address, "--token-file", str(self.token_file),
                "--device", "cpu", "--preferred-stage", str(preferred_stage), "--log-json", str(log_json),
                *(extra or [])]
        proc = self._spawn(args, name)
        self.nodes.append(proc)
        self.logs.append(log_json)
        return proc

    def run_nodes(self, prefix: str, count: int, *, timeout_s: float, preferred_stage: int = -1) -> None:
        """Start ``count`` nodes and wait for all of them to exit 0 (the log tails say why when not)."""
        for i in range(count):
            self.start_node(f"{prefix}{i}", preferred_stage=preferred_stage)
        codes = self.wait_nodes(timeout_s=timeout_s)
        assert codes == [0] * count, f"exit codes {codes}\n{self.tail()}"

    def wait_nodes(self, timeout_s: float) -> list[int | None]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.nodes):
            time.sleep(0.2)
        return [p.poll() for p in self.nodes]

    def records(self, index: int, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.logs[index]
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or record.get("kind") == kind:
                out.append(record)
        return out

    def tail(self, n: int = 30) -> str:
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"== {log.name}\n" + "\n".join(line[:300] for line in lines))
        return "\n".join(parts)

    def close(self) -> None:
        """SIGKILL every process group this run started (tests need no grace) and reap them."""
        self.supervisor.kill_all(graceful_s=0.0)


def data_parallel_overrides(*, steps: int, fragments: int, eval_every: int, backend: str = "grpc") -> list[str]:
    """A short data-parallel run (``model.stages = 1``) of a few node processes on a busy 2-core machine."""
    return [
        "model.stages=1", "model.seq_len=32",
        "train.microbatch_size=4", "train.microbatches=2", f"train.steps={steps}", "train.lr=0.004",
        "train.warmup_steps=5", f"train.eval_every={eval_every}", "train.eval_batches=2",
        "membership.heartbeat_interval_s=0.5", "membership.lease_s=3",
        "diloco.inner_steps=10", f"diloco.fragments={fragments}", "diloco.codec=int8", f"diloco.backend={backend}",
        # replicas drift apart by seconds on a busy 2-core machine: let a round wait for the later ones
        "membership.sync_join_window_s=8", "membership.sync_timeout_s=12",
    ]


def assert_val_loss_fell(run: LocalRun, index: int, steps: int, by: float) -> None:
    """The node's last evaluation is at the run's last step, finite, and ``by`` below its first."""
    evals = run.records(index, "eval")
    assert evals[-1]["step"] == steps and math.isfinite(evals[-1]["val_loss"]), evals
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - by, evals
