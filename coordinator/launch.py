"""Start ``lowband-coordinator serve`` as a child process and wait, bounded, until it listens.

The one way the simulator, the tests and the benchmarks start a coordinator process: the child runs
in its own session (so its whole process group can be signalled), its output goes to a log file,
and ``serve --port-file`` tells us the port it bound (``--bind HOST:0`` picks a free one). If the
child exits or does not listen in time, :class:`CoordinatorStartError` says so with the log's last
lines, and the child is gone. The process-group helpers here are also what
``lowband.sim.procs.Supervisor`` uses, so a supervised child and a launched one start and stop alike.

Nodes never import this module (node and coordinator meet only in ``protocols``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 30
_POLL_S = 0.05


class CoordinatorStartError(RuntimeError):
    """The coordinator process exited, or did not listen in time, before it wrote its port file."""


def start_in_session(argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                     cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, stdin closed, stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(env), cwd=cwd, start_new_session=True)


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid``; a group already gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(popen: subprocess.Popen[bytes], *, graceful: bool = True, timeout_s: float = 5.0) -> int | None:
    """SIGTERM (graceful) or SIGKILL a child's group, SIGKILL if it outlives the wait; returns its exit code.

    The group gets a last SIGKILL either way: a grandchild that ignored SIGTERM must not outlive it.
    """
    if popen.poll() is None:
        signal_group(popen.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            popen.wait(timeout=timeout_s if graceful else 2.0)
        except subprocess.TimeoutExpired:
            signal_group(popen.pid, signal.SIGKILL)
            popen.wait(timeout=5.0)
    signal_group(popen.pid, signal.SIGKILL)
    return popen.returncode


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when there is none yet)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class CoordinatorProcess:
    """A coordinator child that is listening on ``address``."""

    popen: subprocess.Popen[bytes]
    address: str          # HOST:PORT, HOST from --bind, PORT the one it bound
    log_path: Path
    http_address: str = ""   # the dashboard's HOST:PORT when started with ``http`` ('' without)

    @property
    def dashboard_url(self) -> str:
        """The dashboard's address ('' without one); the page wants the token as ``?token=``."""
        return f"http://{self.http_address}/" if self.http_address else ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def poll(self) -> int | None:
        """Its exit code, None while it runs."""
        return self.popen.poll()

    def stop(self, *, graceful: bool = True, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (``serve`` then stops its server within its grace), SIGKILL after ``timeout_s``; the exit code."""
        return stop_group(self.popen, graceful=graceful, timeout_s=timeout_s)


def port_file_for(run_dir: Path) -> Path:
    """Where ``serve`` writes its port: next to the run directory, so a restart on it finds none left over."""
    return run_dir.parent / f"{run_dir.name}.port"


def http_port_file_for(run_dir: Path) -> Path:
    """Where ``serve --http`` writes the dashboard's port (before the gRPC port file)."""
    return run_dir.parent / f"{run_dir.name}.http-port"


def serve_argv(run_dir: Path, *, bind: str, port_file: Path, token_file: Path | None = None,
               config: Path | None = None, overrides: Sequence[str] = (), control_socket: Path | None = None,
               log_level: str | None = None, http: str | None = None, viewer_token_file: Path | None = None,
               metrics_open: bool = False, tls_dir: Path | None = None) -> list[str]:
    """The ``serve`` command line (this interpreter, the installed package)."""
    argv = [sys.executable, "-m", "lowband.coordinator.cli", "serve", "--bind", bind,
            "--run-dir", str(run_dir), "--port-file", str(port_file)]
    if http is not None:
        argv += ["--http", http, "--http-port-file", str(http_port_file_for(run_dir))]
    for flag, value in (("--token-file", token_file), ("--config", config), ("--control-socket", control_socket),
                        ("--log-level", log_level), ("--viewer-token-file", viewer_token_file),
                        ("--tls-dir", tls_dir)):
        if value is not None:
            argv += [flag, str(value)]
    if metrics_open:
        argv.append("--metrics-open")
    for item in overrides:
        argv += ["--set", item]
    return argv


def launch_coordinator(run_dir: Path, *, log_path: Path, bind: str = "127.0.0.1:0", token_file: Path | None = None,
                       config: Path | None = None, overrides: Sequence[str] = (),
                       control_socket: Path | None = None, log_level: str | None = None,
                       env: Mapping[str, str] | None = None, cwd: Path | None = None,
                       wrap: Callable[[list[str]], list[str]] | None = None,
                       timeout_s: float = DEFAULT_START_TIMEOUT_S, http: str | None = None,
                       viewer_token_file: Path | None = None, metrics_open: bool = False,
                       tls_dir: Path | None = None) -> CoordinatorProcess:
    """Start ``serve`` and return once it listens; raise :class:`CoordinatorStartError` (child gone) if it does not.

    ``wrap`` rewrites the command line before it runs (``ip netns exec HOST ...`` for a namespace
    host); the address is ``bind``'s host with the bound port. ``env`` is the child's whole
    environment (None: ours), e.g. with ``LOWBAND_TOKEN`` instead of ``token_file``. ``http``
    (HOST:PORT, port 0: any) turns the dashboard on; ``viewer_token_file``, ``metrics_open`` and ``tls_dir`` as
    ``serve``'s flags of those names.
    """
    port_file = port_file_for(run_dir)
    port_file.unlink(missing_ok=True)
    http_port_file = http_port_file_for(run_dir)
    http_port_file.unlink(missing_ok=True)
    argv = serve_argv(run_dir, bind=bind, port_file=port_file, token_file=token_file, config=config,
                      overrides=overrides, control_socket=control_socket, log_level=log_level, http=http,
                      viewer_token_file=viewer_token_file, metrics_open=metrics_open, tls_dir=tls_dir)
    popen = start_in_session(wrap(argv) if wrap else argv, log_path, env=env, cwd=cwd)
    try:
        port = _wait_for_port(popen, port_file, log_path, timeout_s)
    except BaseException:   # a timeout, or Ctrl-C while waiting: no coordinator left behind either way
        stop_group(popen, graceful=False)
        raise
    address = f"{bind.rpartition(':')[0]}:{port}"
    http_address = ""
    if http is not None:   # written before the gRPC port file, so it is there now
        http_address = f"{http.rpartition(':')[0]}:{int(http_port_file.read_text().strip())}"
    logger.debug("coordinator (pid %d) listening on %s", popen.pid, address)
    return CoordinatorProcess(popen, address, log_path, http_address)


def _wait_for_port(popen: subprocess.Popen[bytes], port_file: Path, log_path: Path, timeout_s: float) -> int:
    # serve writes the file with os.replace once bound, so a file that exists is complete
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        code = popen.poll()
        if code is not None:
            raise CoordinatorStartError(f"coordinator exited with code {code} before listening; "
                                        f"last lines of {log_path}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise CoordinatorStartError(f"coordinator did not listen within {timeout_s:.0f} s; "
                                        f"last lines of {log_path}:\n{log_tail(log_path)}")
        time.sleep(_POLL_S)
    return int(port_file.read_text().strip())
