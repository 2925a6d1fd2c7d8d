"""A test network of real hosts on one machine: Linux network namespaces on one bridge.

Each simulated machine gets a namespace of its own with one interface, ``eth0``, whose
other end is a port of a bridge that lives in a namespace of its own; nothing is added
to the root namespace's network. Every host's uplink (the egress of its ``eth0``) is
shaped by the kernel with ``htb``: bandwidth, queueing and drops are the kernel's, not
the application's. This kernel has no ``netem``, so one-way latency stays in the
nodes' user-space link emulation (``lowband.node.pipeline.transport.LinkTable``).

Addresses come from one private /24 (:data:`SUBNET`) that exists only inside these
namespaces and has no route out: a host can reach the other hosts and nothing else.

Every namespace is named after the process that made it (its pid and start time), so
the network can always be taken down: by :meth:`TestNetwork.close` on a normal end, by
a reaper process that waits on a pipe from the owner and cleans up when the owner dies
by any means (SIGKILL included), and by :func:`clean_leftovers` at the next start, which
removes the namespaces of owners that are gone and kills what still runs in them.
Deleting a namespace deletes its veth end, which deletes the pair, and with them their
qdiscs.

    python -m sim.netns list       # namespaces of live and dead test networks
    python -m sim.netns clean      # remove those whose owner is gone
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SUBNET = "10.231.0"            # /24; hosts get .1 .. .253, the bridge namespace holds no address
PREFIX = "lbn"                  # namespace names: lbn-<owner pid>-<owner start time>-<role>
HOST_DEVICE = "eth0"
BRIDGE = "br0"
MAX_HOSTS = 253
IP_TIMEOUT_S = 20.0
LOOPBACK_HINT = 'use sim.network = "loopback" (the default) to run without namespaces'


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot make network namespaces (not root, or no ip/tc)."""


def check_available() -> None:
    """Refuse early, naming what is missing and the mode that needs none of it."""
    if sys.platform != "linux":
        raise NetnsUnavailable(f"network namespaces need Linux (this is {sys.platform}); {LOOPBACK_HINT}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"network namespaces need {' and '.join(missing)} (Debian: iproute2); {LOOPBACK_HINT}")
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"network namespaces need root (running as uid {os.geteuid()}); {LOOPBACK_HINT}")


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=IP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot; with the pid it names the process uniquely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: count from the last ')'
    return int(stat.rpartition(")")[2].split()[19])


def owner_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{PREFIX}-{pid}-{_start_time(pid)}"


def list_namespaces() -> list[str]:
    """Every test-network namespace on this machine, live owner or not."""
    proc = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(PREFIX + "-"))


def _owner_alive(namespace: str) -> bool:
    parts = namespace.split("-")
    try:
        pid, started = int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return False
    return _start_time(pid) == started


def _kill_inside(namespace: str) -> None:
    proc = _run(["ip", "netns", "pids", namespace], check=False)
    for token in proc.stdout.split():
        try:
            os.kill(int(token), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def delete_namespaces(names: Sequence[str]) -> None:
    """Kill what runs in each namespace, then delete it (its veths and qdiscs go with it)."""
    for name in names:
        _kill_inside(name)
    for name in names:
        for _ in range(20):
            proc = _run(["ip", "netns", "del", name], check=False)
            if proc.returncode == 0 or name not in list_namespaces():
                break
            time.sleep(0.1)   # a process killed a moment ago may still hold it
        else:
            logger.warning("could not delete namespace %s: %s", name, proc.stderr.strip())


def clean_leftovers(tag: str | None = None) -> list[str]:
    """Remove the namespaces of test networks whose owner is gone (or, with `tag`, of that owner)."""
    stale = [n for n in list_namespaces()
             if (n.startswith(tag + "-") if tag else not _owner_alive(n))]
    if stale:
        logger.info("removing %d namespace(s) left by a run that is gone: %s", len(stale), " ".join(stale))
        delete_namespaces(stale)
    return stale


@dataclass(slots=True)
class Host:
    """One machine of the test network."""

    name: str
    namespace: str
    address: str          # its IPv4 address on the bridge
    region: int
    rate_bps: float       # uplink to hosts of its own region, bits/s
    inter_rate_bps: float  # uplink to hosts of other regions, bits/s
    port: str             # the bridge port its eth0 is paired with

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host (``ip netns exec`` keeps the pid: signals reach the program)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _quantum(rate_bps: float) -> int:
    # htb warns when rate / r2q leaves a quantum outside [MTU, 200000]; set it to stay inside
    return int(min(200_000, max(1_514, rate_bps / 8 / 10)))


def _rate(rate_bps: float) -> str:
    return f"{max(8, int(rate_bps))}bit"


@dataclass
class TestNetwork:
    """The bridge and its hosts; use as a context manager, or call ``start`` and ``close``."""

    __test__ = False   # not a pytest class
    tag: str = field(default_factory=owner_tag)
    reaper: bool = True
    hosts: dict[str, Host] = field(default_factory=dict)
    final_tx_bytes: dict[str, int] = field(default_factory=dict)   # hosts removed before the end
    _free: list[int] = field(default_factory=lambda: list(range(1, MAX_HOSTS + 1)))
    _ports: int = 0
    _reaper: subprocess.Popen[bytes] | None = None
    _started: bool = False

    @property
    def bridge_namespace(self) -> str:
        return f"{self.tag}-br"

    def start(self) -> TestNetwork:
        check_available()
        clean_leftovers()
        if self.reaper:
            # Its own session: a Ctrl-C to our process group does not reach it; it outlives a SIGKILL of us.
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "lowband.sim.netns", "reap", "--tag", self.tag],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
        self._started = True
        br = self.bridge_namespace
        _run(["ip", "netns", "add", br])
        _run(["ip", "-n", br, "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", BRIDGE, "up"])
        logger.info("test network %s: bridge namespace %s, subnet %s.0/24", self.tag, br, SUBNET)
        return self

    def add_host(self, name: str, *, rate_bps: float, region: int = 0, inter_rate_bps: float | None = None) -> Host:
        """A new machine with its uplink shaped at `rate_bps` (`inter_rate_bps` towards other regions)."""
        if not self._started:
            raise RuntimeError("TestNetwork.start() first")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        if not self._free:
            raise RuntimeError(f"the test network holds at most {MAX_HOSTS} hosts")
        if rate_bps <= 0 or (inter_rate_bps is not None and inter_rate_bps <= 0):
            raise ValueError("uplink rates must be > 0")
        index = self._free.pop(0)
        self._ports += 1
        host = Host(name=name, namespace=f"{self.tag}-h{index}", address=f"{SUBNET}.{index}", region=region,
                    rate_bps=rate_bps, inter_rate_bps=inter_rate_bps or rate_bps, port=f"p{self._ports}")
        ns, br = host.namespace, self.bridge_namespace
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", HOST_DEVICE, "netns", ns, "type", "veth", "peer", "name", host.port, "netns", br])
        _run(["ip", "-n", br, "link", "set", host.port, "master", BRIDGE, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", HOST_DEVICE])
        _run(["ip", "-n", ns, "link", "set", HOST_DEVICE, "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self._shape(host)
        self.hosts[name] = host
        for other in self.hosts.values():
            if other is not host and other.region != host.region:
                self._route_inter(other, host)
                self._route_inter(host, other)
        return host

    def _tc(self, host: Host, *args: str) -> None:
        _run(["ip", "netns", "exec", host.namespace, "tc", *args])

    def _shape(self, host: Host) -> None:
        """htb on the uplink: class 1:10 (own region, the default) and 1:20 (other regions)."""
        dev = HOST_DEVICE
        self._tc(host, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        for minor, rate in (("10", host.rate_bps), ("20", host.inter_rate_bps)):
            self._tc(host, "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{minor}", "htb",
                     "rate", _rate(rate), "ceil", _rate(rate), "quantum", str(_quantum(rate)))

    def _route_inter(self, host: Host, to: Host) -> None:
        self._tc(host, "filter", "add", "dev", HOST_DEVICE, "parent", "1:", "protocol", "ip", "prio", "1",
                 "u32", "match", "ip", "dst", f"{to.address}/32", "flowid", "1:20")

    def remove_host(self, name: str) -> None:
        """Take a machine off the network (its counter is kept in ``final_tx_bytes``)."""
        host = self.hosts.pop(name)
        self.final_tx_bytes[name] = self.final_tx_bytes.get(name, 0) + self._read_tx(host)
        delete_namespaces([host.namespace])
        index = int(host.address.rsplit(".", 1)[1])
        self._free.append(index)

    @staticmethod
    def _read_tx(host: Host) -> int:
        """Bytes the host's interface sent, as the kernel counts them (``/sys/class/net/eth0/statistics``)."""
        proc = _run(["ip", "netns", "exec", host.namespace, "cat",
                     f"/sys/class/net/{HOST_DEVICE}/statistics/tx_bytes"], check=False)
        try:
            return int(proc.stdout.strip())
        except ValueError:
            return 0

    def tx_bytes(self) -> dict[str, int]:
        """Bytes each host (present or removed) has put on its link so far."""
        out = dict(self.final_tx_bytes)
        for name, host in self.hosts.items():
            out[name] = out.get(name, 0) + self._read_tx(host)
        return out

    def namespaces(self) -> list[str]:
        return [n for n in list_namespaces() if n.startswith(self.tag + "-")]

    def close(self) -> dict[str, int]:
        """Read the final counters, then remove every namespace of this network. Safe to call twice."""
        if not self._started:
            return dict(self.final_tx_bytes)
        counters = self.tx_bytes()
        self.final_tx_bytes = counters
        delete_namespaces(self.namespaces())
        self.hosts.clear()
        self._started = False
        if self._reaper is not None:
            try:
                assert self._reaper.stdin is not None
                self._reaper.stdin.close()   # the reaper finds nothing left and exits
                self._reaper.wait(timeout=IP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                self._reaper.kill()
            self._reaper = None
        return counters

    def __enter__(self) -> TestNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reap(tag: str) -> int:
    """Wait for the owner to close our stdin (it ended, cleanly or not), then remove its namespaces."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    clean_leftovers(tag)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.netns", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the test-network namespaces on this machine as JSON")
    sub.add_parser("clean", help="remove the namespaces of test networks whose owner is gone")
    reap = sub.add_parser("reap", help=argparse.SUPPRESS)
    reap.add_argument("--tag", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "reap":
        return _reap(args.tag)
    check_available()
    if args.command == "list":
        print(json.dumps({n: ("live" if _owner_alive(n) else "orphaned") for n in list_namespaces()}, indent=2))
        return 0
    removed = clean_leftovers()
    print(json.dumps({"removed": removed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
