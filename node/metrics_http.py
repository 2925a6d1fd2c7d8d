"""``lowband-node --metrics HOST:PORT``: the node's own counters in Prometheus text format.

The coordinator's ``/metrics`` already carries every node's last heartbeat; a node's own endpoint is
for watching a node directly (its counters between heartbeats, its heartbeat latency as a histogram,
and a node whose coordinator is unreachable). It reads the same ``NodeMetrics`` snapshot the
heartbeat sends (node/metrics.py), on the node's event loop (aiohttp), at each scrape.

No token: the counters say nothing that lets anyone act on the run; bind it to a private address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lowband.protocols import coordinator_pb2 as pb

logger = logging.getLogger(__name__)

# heartbeats cross a WAN to the coordinator: from loopback-fast to seconds when it is overloaded
HEARTBEAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _NodeCollector(Collector):
    """The latest ``NodeMetrics`` snapshot as metric families labelled with the node and its stage."""

    def __init__(self, snapshot: Callable[[], pb.NodeMetrics], identity: Callable[[], tuple[str, int]]) -> None:
        self.snapshot = snapshot
        self.identity = identity

    def collect(self) -> Iterator[Metric]:
        m = self.snapshot()
        node, stage = self.identity()
        key = [node, str(stage)]
        labels = ["node", "stage"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(key, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(key, value)
            return family

        yield gauge("lowband_node_step", "inner steps the node has taken", m.step)
        yield gauge("lowband_node_outer_step", "outer syncs the node completed", m.outer_step)
        yield gauge("lowband_node_tokens_per_second", "tokens per second (origins)", m.tokens_per_s)
        yield gauge("lowband_node_grad_norm", "last gradient norm of the node's stage", m.grad_norm)
        if m.loss > 0:
            yield gauge("lowband_node_loss", "latest training loss (origins)", m.loss)
        if m.val_loss > 0:
            yield gauge("lowband_node_val_loss", "latest validation loss (origins)", m.val_loss)
        yield counter("lowband_node_tokens", "tokens trained on since the node joined", m.tokens)
        yield counter("lowband_node_bytes_received", "bytes the node received", m.bytes_received)
        yield counter("lowband_rejected_updates", "peers' pseudo-gradient parts refused as a shard owner",
                      m.rejected_updates)
        sent = CounterMetricFamily("lowband_node_bytes_sent", "bytes the node sent, by kind",
                                   labels=[*labels, "kind"])
        known = m.activation_bytes_sent + m.sync_bytes_sent + m.state_bytes_sent
        for kind, value in (("activations", m.activation_bytes_sent), ("sync", m.sync_bytes_sent),
                            ("state", m.state_bytes_sent),
                            ("control", m.control_bytes_sent or max(0, m.bytes_sent - known))):
            sent.add_metric([*key, kind], value)
        yield sent


class NodeMetricsServer:
    """The node's ``/metrics`` endpoint and its heartbeat-latency histogram."""

    def __init__(self, snapshot: Callable[[], pb.NodeMetrics], identity: Callable[[], tuple[str, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_NodeCollector(snapshot, identity))
        self.heartbeat_latency = Histogram("lowband_node_heartbeat_latency_seconds",
                                           "round trip of each answered heartbeat to the coordinator",
                                           buckets=HEARTBEAT_BUCKETS, registry=self.registry)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def start(self, bind: str) -> None:
        """Listen on ``bind`` (HOST:PORT; port 0: any free port); raises OSError if it cannot."""
        host, _, port = bind.rpartition(":")
        app = web.Application()
        app.add_routes([web.get("/metrics", self._metrics)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host.strip("[]") or "127.0.0.1", int(port)).start()
        except BaseException:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = int(self._runner.addresses[0][1])
        logger.info("node metrics on http://%s:%d/metrics", host or "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
