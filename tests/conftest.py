"""Fixtures for tests that start processes; each ends whatever it started, also when the test fails.

* ``coordinator_process``: start ``lowband-coordinator serve`` processes (``lowband.coordinator.launch``);
* ``local_run``: a coordinator and node daemons on loopback (``node_procs.LocalRun``);
* ``sim_process``: ``lowband-sim run`` as a subprocess; nothing of its run may be left behind.

They are factories: a test passes what differs (settings, config, run folder) and may start more
than one (a coordinator restarted on the same run directory).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from node_procs import LocalRun
from sim_leftovers import reap

from lowband.coordinator.launch import CoordinatorProcess, launch_coordinator


@pytest.fixture
def coordinator_process() -> Iterator[Callable[..., CoordinatorProcess]]:
    """``start(run_dir, **launch_coordinator keywords)``; logs to ``RUN_DIR.log`` unless told; all SIGKILLed at the end."""
    started: list[CoordinatorProcess] = []

    def start(run_dir: Path, **kwargs: Any) -> CoordinatorProcess:
        kwargs.setdefault("log_path", run_dir.parent / f"{run_dir.name}.log")
        process = launch_coordinator(run_dir, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(graceful=False)


@pytest.fixture
def local_run(tmp_path: Path) -> Iterator[Callable[..., LocalRun]]:
    """``start(overrides, coordinator=True)``: a LocalRun in ``tmp_path``, its coordinator started unless told not.

    At the end every process group it started is killed, and every process must be gone.
    """
    runs: list[LocalRun] = []

    def start(overrides: list[str], coordinator: bool = True) -> LocalRun:
        run = LocalRun(tmp_path, overrides)
        runs.append(run)
        if coordinator:
            run.start_coordinator()
        return run

    yield start
    for run in runs:
        run.close()
    for run in runs:
        processes = [*run.nodes, *([run.coordinator] if run.coordinator else [])]
        assert all(p.poll() is not None for p in processes), "a process outlived its run"


@pytest.fixture
def sim_process() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start(out, *args)``: ``lowband-sim run ARGS --out OUT --no-progress`` in its own session, output piped.

    At the end its group is killed if it still runs, and no process naming OUT may be left.
    """
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(out: Path, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lowband.sim.cli", "run", *args, "--out", str(out), "--no-progress"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, out))
        return proc

    yield start
    left = [pid for proc, out in started for pid in reap(proc, str(out))]
    for proc, _ in started:
        if proc.stdout:
            proc.stdout.close()
    assert left == [], f"processes left behind: {left}"
