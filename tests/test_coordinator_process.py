"""`lowband-coordinator` as a real subprocess: SIGKILL + restart from SQLite, SIGTERM, the status CLI, and
the launcher's errors when it does not start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from sim_leftovers import leftovers

from lowband.coordinator.launch import CoordinatorProcess, CoordinatorStartError, launch_coordinator
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.rpc import token_metadata

TOKEN = "process-test-token"
MD = token_metadata(TOKEN)
Kind = pb.Instruction.Kind
SETTINGS = ["model.stages=3", "membership.heartbeat_interval_s=0.3", "membership.lease_s=1.5"]


def _env() -> dict[str, str]:
    env = dict(os.environ, LOWBAND_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    env.pop("LOWBAND_TOKEN_FILE", None)
    return env


@pytest.fixture
def serve(coordinator_process: Callable[..., CoordinatorProcess]) -> Callable[..., CoordinatorProcess]:
    """``serve(run_dir, *settings)``: a coordinator on a free port with this file's settings, killed at the end."""
    def start(run_dir: Path, *extra: str) -> CoordinatorProcess:
        return coordinator_process(run_dir, overrides=[*SETTINGS, *extra], log_level="WARNING", env=_env(),
                                   timeout_s=20)
    return start


def _stub(port: int) -> tuple[grpc.Channel, pb_grpc.CoordinatorStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.CoordinatorStub(channel)


def _join(stub: pb_grpc.CoordinatorStub, port: int, node_id: str = "", stage: int = -1) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(node_id=node_id, address=f"127.0.0.1:{port}", device="cpu", throughput=2.0,
                                    version="0.1", stage=stage, preferred_stage=-1, has_data=True,
                                    memory_bytes=8_000_000_000),
                     metadata=MD, timeout=10)


def _beat(stub: pb_grpc.CoordinatorStub, node_id: str, epoch: int, step: int) -> pb.HeartbeatReply:
    return stub.Heartbeat(pb.HeartbeatRequest(node_id=node_id, epoch=epoch,
                                              metrics=pb.NodeMetrics(step=step, loss=2.5, tokens_per_s=321.0,
                                                                     bytes_sent=4096, bytes_received=2048)),
                          metadata=MD, timeout=10)


def test_sigkill_and_restart_resumes_identities_and_stages(tmp_path: Path,
                                                           serve: Callable[..., CoordinatorProcess]) -> None:
    run_dir = tmp_path / "run"
    first = serve(run_dir, "membership.lease_s=10")
    channel, stub = _stub(first.port)
    nodes = [_join(stub, 9000 + i) for i in range(5)]
    stages = {r.node_id: r.stage for r in nodes}
    for r in nodes:
        _beat(stub, r.node_id, r.epoch, step=7)
    round_reply = stub.JoinSyncRound(pb.SyncRoundRequest(node_id=nodes[2].node_id, stage=nodes[2].stage,
                                                         fragment=0, outer_step=2), metadata=MD, timeout=10)
    assert round_reply.ready
    epoch = stub.Status(pb.StatusRequest(), metadata=MD, timeout=10).epoch
    channel.close()
    os.killpg(first.pid, signal.SIGKILL)
    first.popen.wait(timeout=10)

    second = serve(run_dir, "membership.lease_s=10")
    channel, stub = _stub(second.port)
    # unknown to the restarted process until they re-register: heartbeats say REJOIN
    assert _beat(stub, nodes[0].node_id, epoch, step=8).instruction.kind == Kind.REJOIN
    for r in nodes:
        again = _join(stub, 9000 + nodes.index(r), node_id=r.node_id, stage=stages[r.node_id])
        assert again.node_id == r.node_id and again.stage == stages[r.node_id]
        assert again.instruction.kind == Kind.NONE  # weights in hand: nothing to fetch
        assert again.epoch > epoch
    for r in nodes:
        assert _beat(stub, r.node_id, 0, step=9).instruction.kind == Kind.RELOAD_SCHEDULE
    st = stub.Status(pb.StatusRequest(max_events=100), metadata=MD, timeout=10)
    assert {n.node_id: n.stage for n in st.nodes} == stages
    assert all(n.state == "alive" for n in st.nodes)
    assert st.outer_step == 2
    assert any(e.kind == "restart" for e in st.events)
    assert sum(e.kind == "join" for e in st.events) == 5  # events from before the kill survived
    # training continues: the next sync round gets a higher id than before the kill
    nxt = stub.JoinSyncRound(pb.SyncRoundRequest(node_id=nodes[2].node_id, stage=nodes[2].stage,
                                                 fragment=0, outer_step=3), metadata=MD, timeout=10)
    assert nxt.round_id > round_reply.round_id
    channel.close()


def test_sigterm_stops_cleanly(tmp_path: Path, serve: Callable[..., CoordinatorProcess]) -> None:
    coordinator = serve(tmp_path / "run")
    channel, stub = _stub(coordinator.port)
    _join(stub, 9000)
    channel.close()
    coordinator.popen.send_signal(signal.SIGTERM)
    assert coordinator.popen.wait(timeout=15) == 0
    assert f"listening on 127.0.0.1:{coordinator.port}" in coordinator.log_path.read_text()


def _status_cli(port: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowband.coordinator.cli", "status", "--coordinator",
                           f"127.0.0.1:{port}", *args], env=env or _env(), capture_output=True, text=True,
                          timeout=60)


def test_status_cli_against_live_coordinator(tmp_path: Path, serve: Callable[..., CoordinatorProcess]) -> None:
    # a long lease: each CLI run takes a second or more on a busy machine and nobody heartbeats meanwhile
    coordinator = serve(tmp_path / "run", "membership.lease_s=60")
    port = coordinator.port
    channel, stub = _stub(port)
    nodes = [_join(stub, 9000 + i) for i in range(4)]
    for r in nodes[:3]:
        _beat(stub, r.node_id, r.epoch, step=3)
    stub.Leave(pb.LeaveRequest(node_id=nodes[3].node_id, reason="bye"), metadata=MD, timeout=10)

    out = _status_cli(port, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {n["node_id"] for n in data["nodes"]} == {r.node_id for r in nodes}
    by_id = {n["node_id"]: n for n in data["nodes"]}
    assert by_id[nodes[3].node_id]["state"] == "left"
    assert by_id[nodes[0].node_id]["tokens_per_s"] == pytest.approx(321.0)
    assert by_id[nodes[0].node_id]["bytes_sent"] == 4096
    assert by_id[nodes[0].node_id]["memory_bytes"] == 8_000_000_000   # as the node reported it at join
    assert data["stage_coverage"] == {"0": 1, "1": 1, "2": 1}
    assert [e["kind"] for e in data["events"]].count("join") == 4
    assert "leave" in [e["kind"] for e in data["events"]]

    out = _status_cli(port)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for r in nodes:
        assert r.node_id in text
    assert "stage coverage" in text and "0:1  1:1  2:1" in text
    assert "321.0" in text and "left" in text and "recent events" in text
    assert "8.0GB" in text

    token_file = tmp_path / "wrong.token"
    token_file.write_text("not-the-token\n")
    bad = _status_cli(port, "--token-file", str(token_file))
    assert bad.returncode != 0 and "token" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    channel.close()
    coordinator.stop(graceful=False)

    unreachable = _status_cli(port)  # the coordinator is gone now
    assert unreachable.returncode != 0
    assert "unreachable" in unreachable.stderr and len(unreachable.stderr.strip().splitlines()) == 1


def test_a_coordinator_that_exits_before_listening_says_why(tmp_path: Path,
                                                            serve: Callable[..., CoordinatorProcess]) -> None:
    with pytest.raises(CoordinatorStartError, match=r"(?s)exited with code 2 before listening.*model\.stages"):
        serve(tmp_path / "run", "model.stages=0")


def test_a_coordinator_that_never_listens_is_stopped(tmp_path: Path) -> None:
    marker = str(tmp_path / "never-listens")
    # stands in for a coordinator stuck before binding: it never writes the port file
    stuck = [sys.executable, "-c", "import sys, time; print('starting', flush=True); time.sleep(60)", marker]
    with pytest.raises(CoordinatorStartError, match=r"(?s)did not listen within 1 s.*starting"):
        launch_coordinator(tmp_path / "run", log_path=tmp_path / "run.log", wrap=lambda _argv: stuck, timeout_s=1)
    assert leftovers(marker) == []
