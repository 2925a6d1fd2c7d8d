"""`lowband-node --metrics HOST:PORT`: a live node's own Prometheus endpoint, read back with
prometheus_client's parser, and the heartbeat round trip it measures reaching the coordinator."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from node_procs import TOKEN, LocalRun, data_parallel_overrides
from prometheus_client.parser import text_string_to_metric_families

from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.rpc import token_metadata
from lowband.sim.procs import free_port


def _scrape(url: str) -> dict[str, list] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None   # not listening yet (the node imports torch first)
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_node_serves_its_own_metrics(local_run: Callable[..., LocalRun]) -> None:
    run = local_run(data_parallel_overrides(steps=400, fragments=1, eval_every=200))
    port = free_port()
    node = run.start_node("n0", extra=["--metrics", f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 90
    while True:
        assert node.poll() is None, run.tail()
        assert time.monotonic() < deadline, f"no step and heartbeat in {url}\n{run.tail()}"
        families = _scrape(url)
        if families and families["lowband_node_step"][0].value > 0 and \
                any(s.name.endswith("_count") and s.value >= 2 for s in families["lowband_node_heartbeat_latency_seconds"]):
            break
        time.sleep(0.5)

    step = families["lowband_node_step"][0]
    assert step.labels["stage"] == "0" and step.labels["node"]
    node_id = step.labels["node"]
    kinds = {s.labels["kind"] for s in families["lowband_node_bytes_sent"] if s.name.endswith("_total")}
    assert kinds == {"activations", "sync", "state", "control"}
    assert families["lowband_node_tokens"][0].value > 0
    buckets = [s for s in families["lowband_node_heartbeat_latency_seconds"] if s.name.endswith("_bucket")]
    assert buckets and buckets[-1].labels["le"] == "+Inf"

    # the coordinator hears the same round trip in the heartbeat (NodeMetrics.heartbeat_rtt_s)
    with grpc.insecure_channel(run.address) as channel:
        status = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), metadata=token_metadata(TOKEN),
                                                         timeout=10)
    reported = {n.node_id: n.metrics for n in status.nodes}
    assert reported[node_id].heartbeat_rtt_s > 0

    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=30) == 0, run.tail()
    assert _scrape(url) is None   # the endpoint closed with the node
