"""The coordinator's dashboard as a real `serve --http` subprocess: who may read it, what /metrics says
(read back with prometheus_client's own parser), that /api/status and `status --json` are one document,
and that `status --watch` rides out a coordinator restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lowband.coordinator.launch import CoordinatorProcess
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.config import ConfigError
from lowband.protocols.rpc import token_metadata
from lowband.sim.config import load_sim_config

TOKEN = "dashboard-test-token"
VIEWER = "dashboard-viewer-token"
MD = token_metadata(TOKEN)
# a long lease: nobody heartbeats between the test's steps, and the CLI runs take a second or more
SETTINGS = ["model.stages=2", "membership.heartbeat_interval_s=0.3", "membership.lease_s=60"]


def _env() -> dict[str, str]:
    env = dict(os.environ, LOWBAND_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    env.pop("LOWBAND_TOKEN_FILE", None)
    return env


@pytest.fixture
def serve(coordinator_process: Callable[..., CoordinatorProcess],
          tmp_path: Path) -> Callable[..., CoordinatorProcess]:
    """``serve(run_dir, metrics_open=False)``: a coordinator with its dashboard on a free port, killed at the end."""
    viewer = tmp_path / "viewer.token"
    viewer.write_text(VIEWER + "\n")

    def start(run_dir: Path, *, metrics_open: bool = False, **kwargs: Any) -> CoordinatorProcess:
        return coordinator_process(run_dir, overrides=SETTINGS, log_level="WARNING", env=_env(), timeout_s=20,
                                   http="127.0.0.1:0", viewer_token_file=viewer, metrics_open=metrics_open,
                                   **kwargs)
    return start


def _get(url: str, token: str | None = None, *, query_token: str | None = None) -> tuple[int, bytes]:
    if query_token is not None:
        url += ("&" if "?" in url else "?") + f"token={query_token}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _join(stub: pb_grpc.CoordinatorStub, port: int, stage: int) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(address=f"127.0.0.1:{port}", device="cpu", throughput=2.0, version="0.1",
                                    stage=-1, preferred_stage=stage, has_data=stage == 0),
                     metadata=MD, timeout=10)


def _beat(stub: pb_grpc.CoordinatorStub, reply: pb.JoinReply, step: int, loss: float, rejected: int = 2) -> None:
    metrics = pb.NodeMetrics(step=step, loss=loss if reply.stage == 0 else 0.0, tokens_per_s=100.0 * step,
                             bytes_sent=10_000 * step, activation_bytes_sent=6_000 * step, sync_bytes_sent=1_000 * step,
                             state_bytes_sent=0, control_bytes_sent=2_500 * step, rejected_updates=rejected,
                             heartbeat_rtt_s=0.004, outer_step=1)
    stub.Heartbeat(pb.HeartbeatRequest(node_id=reply.node_id, epoch=reply.epoch, metrics=metrics), metadata=MD,
                   timeout=10)


def _start_run(coordinator: CoordinatorProcess) -> tuple[grpc.Channel, list[pb.JoinReply]]:
    """Two origins and one stage-1 node, two heartbeats a sample apart, and one formed sync round."""
    channel = grpc.insecure_channel(coordinator.address)
    stub = pb_grpc.CoordinatorStub(channel)
    nodes = [_join(stub, 9100 + i, stage) for i, stage in enumerate((0, 0, 1))]
    for r in nodes:
        _beat(stub, r, step=3, loss=3.0)
    for r in nodes[:2]:   # both origins ask for the same round: it forms
        stub.JoinSyncRound(pb.SyncRoundRequest(node_id=r.node_id, stage=0, fragment=0, outer_step=1),
                           metadata=MD, timeout=10)
    time.sleep(1.3)       # the watch samples every second: the second loss point lands in a new sample
    for r in nodes:
        _beat(stub, r, step=5, loss=2.5)
    return channel, nodes


def _document(coordinator: CoordinatorProcess, origins: int) -> dict[str, Any]:
    """/api/status once both loss points of every origin are in it."""
    deadline = time.monotonic() + 10
    while True:
        code, body = _get(coordinator.dashboard_url + "api/status", TOKEN)
        assert code == 200, body
        doc = json.loads(body)
        if len(doc["loss"]) == origins and all(len(p) >= 2 for p in doc["loss"].values()):
            return doc
        assert time.monotonic() < deadline, f"loss history never filled: {doc['loss']}"
        time.sleep(0.2)


def test_dashboard_status_and_metrics_behind_the_token(tmp_path: Path, serve: Callable[..., CoordinatorProcess]
                                                       ) -> None:
    coordinator = serve(tmp_path / "run")
    base = coordinator.dashboard_url
    channel, nodes = _start_run(coordinator)
    try:
        for path in ("", "api/status", "metrics"):
            assert _get(base + path)[0] == 401, path
            assert _get(base + path, "not-the-token")[0] == 401, path
            assert _get(base + path, query_token="not-the-token")[0] == 401, path
            assert _get(base + path, TOKEN)[0] == 200, path
            assert _get(base + path, VIEWER)[0] == 200, path
        code, page = _get(base, query_token=TOKEN)   # how a browser opens it
        assert code == 200 and b'id="loss-chart"' in page
        # the viewer token opens the pages only: the gRPC service still refuses it
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), metadata=token_metadata(VIEWER), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        doc = _document(coordinator, origins=2)
        assert {n["node_id"] for n in doc["nodes"]} == {r.node_id for r in nodes}
        assert doc["stage_coverage"] == {"0": 2, "1": 1}
        origins = {r.node_id for r in nodes if r.stage == 0}
        assert set(doc["loss"]) == origins
        for points in doc["loss"].values():
            assert [p[1:] for p in points[-2:]] == [[3, 3.0], [5, 2.5]]   # (time, step, loss)
        assert doc["sync_rounds"] == [{"stage": 0, "fragment": 0, "formed": 1, "failed": 0, "last_outer_step": 1}]
        assert doc["bytes_per_s"]["now"]["activations"] > 0
        by_id = {n["node_id"]: n for n in doc["nodes"]}
        assert by_id[nodes[0].node_id]["bytes_sent_by_kind"] == {"activations": 30_000, "sync": 5_000, "state": 0,
                                                                 "control": 12_500}
        # the event log without the routine sync rounds; a node refusing more parts is logged once the
        # coordinator has seen its earlier count (the 2 it reported from the start are history)
        assert [e["kind"] for e in doc["membership_events"]].count("join") == 3
        assert "sync-round" in [e["kind"] for e in doc["events"]]
        assert "sync-round" not in [e["kind"] for e in doc["membership_events"]]
        assert "rejected-update" not in [e["kind"] for e in doc["membership_events"]]
        _beat(pb_grpc.CoordinatorStub(channel), nodes[0], step=6, loss=2.4, rejected=5)
        deadline = time.monotonic() + 10
        while not (refused := [e for e in json.loads(_get(base + "api/status", TOKEN)[1])["membership_events"]
                               if e["kind"] == "rejected-update"]):
            assert time.monotonic() < deadline, "no rejected-update event"
            time.sleep(0.2)
        assert refused[0]["node_id"] == nodes[0].node_id and "refused 3" in refused[0]["detail"]

        # `status --json` prints the same document (its own coordinator address added)
        cli = subprocess.run([sys.executable, "-m", "lowband.coordinator.cli", "status", "--coordinator",
                              coordinator.address, "--json"], env=_env(), capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        printed = json.loads(cli.stdout)
        assert set(printed) == set(doc) | {"coordinator"}
        assert {n["node_id"] for n in printed["nodes"]} == set(by_id)
        assert printed["loss"].keys() == doc["loss"].keys()

        code, text = _get(base + "metrics", TOKEN)
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}

        def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
            assert name in families, sorted(families)
            return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples
                    if not s.name.endswith("_created")}

        origin = nodes[0].node_id
        members = samples("lowband_members")
        assert members[(("stage", "0"), ("state", "alive"))] == 2
        assert members[(("stage", "1"), ("state", "alive"))] == 1
        assert samples("lowband_node_step")[(("node", origin), ("stage", "0"))] == 6
        assert samples("lowband_node_outer_step")[(("node", origin), ("stage", "0"))] == 1
        assert samples("lowband_outer_step")[()] >= 1
        loss = samples("lowband_node_loss")
        assert {dict(k)["node"]: v for k, v in loss.items()} == {nodes[0].node_id: 2.4, nodes[1].node_id: 2.5}
        assert samples("lowband_node_tokens_per_second")[(("node", origin), ("stage", "0"))] == 600
        sent = samples("lowband_node_bytes_sent")
        assert sent[(("kind", "activations"), ("node", origin), ("stage", "0"))] == 36_000
        assert {dict(k)["kind"] for k in sent} == {"activations", "sync", "state", "control"}
        assert set(dict(k)["kind"] for k in samples("lowband_bytes_per_second")) == {"activations", "sync", "state",
                                                                                      "control"}
        assert samples("lowband_sync_rounds_formed")[(("fragment", "0"), ("stage", "0"))] == 1
        assert samples("lowband_sync_rounds_failed")[(("fragment", "0"), ("stage", "0"))] == 0
        assert samples("lowband_recoveries") == {(): 0}
        assert samples("lowband_rejected_updates")[(("node", origin), ("stage", "0"))] == 5
        assert samples("lowband_heartbeat_latency_seconds")[(("node", origin), ("stage", "0"))] == 0.004
        assert (("node", origin), ("stage", "0")) in samples("lowband_heartbeat_age_seconds")
    finally:
        channel.close()


def test_metrics_open_leaves_only_metrics_without_a_token(tmp_path: Path,
                                                          serve: Callable[..., CoordinatorProcess]) -> None:
    coordinator = serve(tmp_path / "run", metrics_open=True)
    code, text = _get(coordinator.dashboard_url + "metrics")
    assert code == 200
    assert "lowband_members" in {f.name for f in text_string_to_metric_families(text.decode())}
    assert _get(coordinator.dashboard_url)[0] == 401
    assert _get(coordinator.dashboard_url + "api/status", "not-the-token")[0] == 401
    coordinator.popen.send_signal(signal.SIGTERM)   # the dashboard stops with the coordinator, cleanly
    assert coordinator.popen.wait(timeout=15) == 0
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(coordinator.dashboard_url + "metrics", timeout=5)


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[str], timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while needle not in (text := path.read_text()):
        assert proc.poll() is None, f"status --watch exited {proc.returncode}: {text[-2000:]}"
        assert time.monotonic() < deadline, f"no {needle!r} in: {text[-2000:]}"
        time.sleep(0.1)
    return text


def test_status_watch_reconnects_through_a_coordinator_restart(
        tmp_path: Path, serve: Callable[..., CoordinatorProcess]) -> None:
    run_dir, socket = tmp_path / "run", tmp_path / "coordinator.sock"
    first = serve(run_dir, control_socket=socket)
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        watch = subprocess.Popen([sys.executable, "-m", "lowband.coordinator.cli", "status", "--coordinator",
                                  f"unix:{socket}", "--watch", "--json", "--interval", "0.3"],
                                 env=_env(), stdout=stdout, stderr=stderr, text=True, start_new_session=True)
    try:
        _wait_for(out, "\n", watch)
        first_epoch = json.loads(out.read_text().splitlines()[0])["epoch"]
        first.stop(graceful=False)   # SIGKILL: the watch must not end with it
        _wait_for(err, "reconnecting", watch)
        printed = len(out.read_text().splitlines())
        serve(run_dir, control_socket=socket)   # the same run directory: the run resumes, in a new epoch
        _wait_for(err, "reconnected", watch)
        deadline = time.monotonic() + 30
        while len(lines := out.read_text().splitlines()) <= printed:
            assert time.monotonic() < deadline, "no status after the restart"
            time.sleep(0.1)
        assert json.loads(lines[-1])["epoch"] > first_epoch
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=10) == 0
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait(timeout=10)


def test_sim_dashboard_setting_is_checked() -> None:
    assert load_sim_config(None, ["sim.dashboard=127.0.0.1:8080"]).sim.dashboard == "127.0.0.1:8080"
    assert load_sim_config(None, ["sim.dashboard="]).sim.dashboard == ""
    with pytest.raises(ConfigError, match=r"sim\.dashboard"):
        load_sim_config(None, ["sim.dashboard=localhost"])
