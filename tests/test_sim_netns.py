"""The namespace test network (sim/netns.py) and `lowband-sim run` on it.

These need root and iproute2 (`ip`, `tc`); elsewhere they skip with that reason. Each
test lists the namespaces and the root namespace's links before and after, so a
leftover (a namespace, a veth, a process inside) fails it whatever path the run took:
a normal end, or the SIGKILL of the process that made the network.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from netns_support import needs_netns
from sim_leftovers import leftovers, reap

from lowband.sim import netns
from lowband.sim.netns import NetnsUnavailable, TestNetwork, check_available, list_namespaces

ROOT = Path(__file__).resolve().parent.parent


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


SINK = "import socket,sys;s=socket.socket();s.bind((sys.argv[1],9000));s.listen();c,_=s.accept();n=0\n" \
       "while (d:=c.recv(1<<16)): n+=len(d)\nprint(n)"
SOURCE = "import socket,sys;s=socket.create_connection((sys.argv[1],9000));s.sendall(b'x'*int(sys.argv[2]));" \
         "s.shutdown(socket.SHUT_WR);s.recv(1)"


@needs_netns
def test_hosts_reach_each_other_through_a_shaped_uplink_and_everything_is_removed() -> None:
    links_before = _root_links()
    payload = 1_000_000
    with TestNetwork() as net:
        a = net.add_host("a", rate_bps=4e6)
        b = net.add_host("b", rate_bps=100e6)
        assert a.address != b.address and a.address.startswith(netns.SUBNET + ".")
        assert len(net.namespaces()) == 3   # the bridge's and one per host
        assert _root_links() == links_before, "nothing may be added to the root namespace's network"
        sink = subprocess.Popen(b.wrap([sys.executable, "-c", SINK, b.address]), stdout=subprocess.PIPE)
        try:
            time.sleep(0.5)
            started = time.monotonic()
            subprocess.run(a.wrap([sys.executable, "-c", SOURCE, b.address, str(payload)]), check=True, timeout=60)
            seconds = time.monotonic() - started
            received = int(sink.communicate(timeout=30)[0])
        finally:
            sink.kill()
        counters = net.tx_bytes()
        tag = net.tag
    assert received == payload
    # 1 MB at 4 Mbit/s is 2 s on the wire: the kernel's shaping, not the program, sets the pace
    assert seconds > 1.4, f"{payload} bytes crossed a 4 Mbit/s uplink in {seconds:.2f} s"
    assert payload <= counters["a"] < payload * 1.1, counters
    assert counters["b"] < payload * 0.1, counters   # b only acknowledged
    assert [n for n in list_namespaces() if n.startswith(tag)] == []
    assert _root_links() == links_before


@needs_netns
def test_hosts_of_other_regions_get_the_inter_region_rate() -> None:
    with TestNetwork() as net:
        a = net.add_host("a", rate_bps=200e6, region=0, inter_rate_bps=4e6)
        near = net.add_host("near", rate_bps=200e6, region=0)
        far = net.add_host("far", rate_bps=200e6, region=1)
        times = {}
        for peer in (near, far):
            sink = subprocess.Popen(peer.wrap([sys.executable, "-c", SINK, peer.address]), stdout=subprocess.PIPE)
            try:
                time.sleep(0.5)
                started = time.monotonic()
                subprocess.run(a.wrap([sys.executable, "-c", SOURCE, peer.address, "500000"]), check=True, timeout=60)
                times[peer.name] = time.monotonic() - started
                sink.communicate(timeout=30)
            finally:
                sink.kill()
    assert times["far"] > 0.7, times            # 0.5 MB at 4 Mbit/s: 1 s
    assert times["far"] > 2 * times["near"], times


OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from lowband.sim.netns import TestNetwork
    net = TestNetwork(reaper={reaper}).start()
    host = net.add_host("a", rate_bps=10e6)
    subprocess.Popen(host.wrap(["sleep", "300"]), start_new_session=True)
    print(net.tag, flush=True)
    time.sleep(300)
""")


def _sigkilled_owner(reaper: bool) -> tuple[str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER.format(reaper=reaper)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        tag = proc.stdout.readline().strip()
        assert tag, "the owner did not start its network"
        names = [n for n in list_namespaces() if n.startswith(tag)]
        assert len(names) == 2
    finally:
        proc.kill()
        proc.wait()
    return tag, names


def _pids_inside(names: list[str]) -> list[int]:
    pids = []
    for name in names:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids


@needs_netns
def test_the_reaper_removes_the_network_of_an_owner_killed_by_sigkill() -> None:
    tag, _ = _sigkilled_owner(reaper=True)
    _wait_until(lambda: not [n for n in list_namespaces() if n.startswith(tag)], 30, "the reaper to clean up")


@needs_netns
def test_the_next_start_removes_leftovers_and_kills_what_runs_in_them() -> None:
    tag, names = _sigkilled_owner(reaper=False)
    inside = _pids_inside(names)
    assert inside, "the owner's process should still run in its namespace"
    removed = netns.clean_leftovers()
    assert set(names) <= set(removed)
    assert not [n for n in list_namespaces() if n.startswith(tag)]
    _wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and
                                Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" for pid in inside),
                10, "the processes inside to die")


def test_without_root_or_iproute2_the_error_says_so_and_names_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    with pytest.raises(NetnsUnavailable, match=r"ip and tc .*sim\.network = \"loopback\""):
        check_available()
    monkeypatch.setattr(netns.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailable, match=r"root .*loopback"):
        check_available()


def test_sim_refuses_netns_without_root_before_starting_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """As another user (or without iproute2): exit code 1 and the message, and no process started."""
    from lowband.sim import run as sim_run

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    spawned: list[str] = []
    monkeypatch.setattr(sim_run.Supervisor, "spawn", lambda self, name, *a, **k: spawned.append(name))
    out = tmp_path / "run"
    args = argparse.Namespace(config=None, set=["sim.network=netns"], steps=None, seed=None, out=str(out),
                              no_progress=True)
    assert sim_run.main(args) == 1
    err = capsys.readouterr().err
    assert "network namespaces need root" in err and 'sim.network = "loopback"' in err
    assert spawned == []
    assert not (out / "summary.json").exists()


def _sim_run(out: Path, flags: list[str], timeout_s: float) -> tuple[dict, list[int]]:
    """`lowband-sim run FLAGS --out OUT` to its end: its summary, and any process of it still alive."""
    proc = subprocess.Popen([sys.executable, "-m", "lowband.sim.cli", "run", *flags, "--out", str(out), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    finally:
        survivors = reap(proc, str(out))
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return json.loads((out / "summary.json").read_text()), survivors


NETNS_RUN = """
[model]
stages = 3
seq_len = 64

[train]
steps = 40
eval_every = 10
microbatches = 2
microbatch_size = 4

[diloco]
inner_steps = 8
fragments = 1

[membership]
heartbeat_interval_s = 0.3
lease_s = 1.5

[sim]
network = "netns"
origins = 1
replicas_per_stage = 1
intra_bandwidth_Bps = 2.5e6
max_wall_s = 200
"""


@needs_netns
@pytest.mark.slow
def test_sim_run_on_namespace_hosts_counts_kernel_bytes_and_leaves_nothing(tmp_path: Path) -> None:
    links_before = _root_links()
    namespaces_before = list_namespaces()
    config = tmp_path / "netns.toml"
    config.write_text(NETNS_RUN)
    out = tmp_path / "run"
    # plaintext: what the nodes count leaves out TLS's handshakes and record framing (with TLS, the
    # simulator's default, this run's kernel count was 1.19x the nodes')
    summary, survivors = _sim_run(out, ["--config", str(config), "--no-tls"], timeout_s=280)
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    network = summary["network_bytes"]
    assert set(network["per_host"]) == {"coordinator", "origin-1", "stage1-2", "stage2-3"}
    assert all(v > 0 for v in network["per_host"].values())
    # every kind the nodes count (activations, sync, stage-0 copies, control) against the kernel's count
    app = summary["total_bytes_sent"]
    assert 0.9 < network["total"] / app < 1.15, (network["total"], summary)
    nodes = [json.loads(line) for line in (out / "nodes" / "origin-1.jsonl").read_text().splitlines()]
    start = next(r for r in nodes if r["kind"] == "start")
    assert start["address"].startswith(netns.SUBNET + "."), start
    assert summary["peak_rss_bytes"]["max"] > 50 << 20
    assert survivors == []
    assert set(list_namespaces()) <= set(namespaces_before)   # other runs may end meanwhile, none of ours stays
    assert _root_links() == links_before


@needs_netns
@pytest.mark.slow
def test_sigkill_of_the_simulator_leaves_no_namespace_or_process(tmp_path: Path) -> None:
    namespaces_before = list_namespaces()
    config = tmp_path / "netns.toml"
    config.write_text(NETNS_RUN.replace("steps = 40", "steps = 400"))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lowband.sim.cli", "run", "--config", str(config), "--out", str(out),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until(lambda: len(leftovers(str(out))) >= 4, 90, "the coordinator and nodes to start")
        _wait_until(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, 90,
                    "the run to train")
        ours = [n for n in list_namespaces() if n not in namespaces_before]
        assert len(ours) == 5   # bridge, coordinator and three nodes
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait_until(lambda: set(list_namespaces()) <= set(namespaces_before), 60, "the namespaces to be removed")
    _wait_until(lambda: leftovers(str(out)) == [], 30, "every process of the run to end")


@needs_netns
@pytest.mark.slow
def test_the_default_run_on_namespace_hosts_passes_the_loopback_defaults_checks(tmp_path: Path) -> None:
    """The quick start's run with only `sim.network` changed: preemptions, a CheckFree recovery, loss
    falling, and the kernel's byte count within 10% of what lowband counted (plaintext: the counts leave
    out TLS's handshakes and record framing)."""
    namespaces_before = list_namespaces()
    out = tmp_path / "run"
    summary, survivors = _sim_run(out, ["--set", "sim.network=netns", "--no-tls"], timeout_s=420)
    assert summary["steps"] >= 160
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 2.0
    assert summary["failures"] >= 2 and summary["recoveries"] >= 1
    assert abs(summary["network_vs_application"] - 1.0) <= 0.10, summary["network_vs_application"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "death" for e in events)
    assert "Per host" in (out / "report.html").read_text()
    assert survivors == []
    assert set(list_namespaces()) <= set(namespaces_before)   # other runs may end meanwhile, none of ours stays
