"""``/metrics``: the run's status document in Prometheus text format, through ``prometheus_client``.

A collector, not a set of live metric objects: each scrape reads the same document the page and
``status --json`` read (coordinator/watch.py), so the numbers never disagree and nothing is updated
on the heartbeat path. Per-node series carry ``node`` and ``stage`` labels and cover live nodes only
(a dead node's series end with it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lowband.coordinator.watch import KINDS, RunWatch

logger = logging.getLogger(__name__)

LIVE = ("alive", "recovering")
STATES = ("alive", "recovering", "dead", "left")


class RunCollector(Collector):
    """Yields the coordinator's metrics from one status document per scrape."""

    def __init__(self, watch: RunWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterator[Metric]:
        doc = self.watch.document(max_events=0, history=False)
        yield from _run_metrics(doc)
        yield from _node_metrics([n for n in doc["nodes"] if n["state"] in LIVE])
        yield from _round_metrics(doc["sync_rounds"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _run_metrics(doc: dict[str, Any]) -> Iterator[Metric]:
    yield _gauge("lowband_epoch", "membership epoch", doc["epoch"])
    yield _gauge("lowband_outer_step", "highest outer step completed by a live node or a formed round",
                 doc["outer_step"])
    members = GaugeMetricFamily("lowband_members", "nodes known to the coordinator, by stage and state",
                                labels=["stage", "state"])
    counts: dict[tuple[int, str], int] = {(s, st): 0 for s in range(doc["stages"]) for st in STATES}
    for n in doc["nodes"]:
        counts[(n["stage"], n["state"])] = counts.get((n["stage"], n["state"]), 0) + 1
    for (stage, state), count in sorted(counts.items()):
        members.add_metric([str(stage), state], count)
    yield members
    rate = GaugeMetricFamily("lowband_bytes_per_second", "bytes per second the live nodes send, by kind",
                             labels=["kind"])
    for kind in KINDS:
        rate.add_metric([kind], doc["bytes_per_s"]["now"][kind])
    yield rate
    counts_doc = doc["counts"]
    yield CounterMetricFamily("lowband_recoveries", "stage recoveries completed (CheckFree, copies)",
                              value=counts_doc.get("recovery", 0))
    events = CounterMetricFamily("lowband_events", "coordinator events since it started, by kind", labels=["kind"])
    for kind, count in counts_doc.items():
        if kind != "rejected_updates":
            events.add_metric([kind], count)
    yield events


def _node_metrics(nodes: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["node", "stage"]
    gauges = {
        "step": GaugeMetricFamily("lowband_node_step", "inner steps the node has taken", labels=labels),
        "outer_step": GaugeMetricFamily("lowband_node_outer_step", "outer syncs the node completed", labels=labels),
        "tokens_per_s": GaugeMetricFamily("lowband_node_tokens_per_second", "tokens per second (origins)",
                                          labels=labels),
        "heartbeat_age_s": GaugeMetricFamily("lowband_heartbeat_age_seconds",
                                             "seconds since the node's last heartbeat", labels=labels),
        "heartbeat_rtt_s": GaugeMetricFamily("lowband_heartbeat_latency_seconds",
                                             "round trip of the node's last heartbeat, as it measured it",
                                             labels=labels),
    }
    loss = GaugeMetricFamily("lowband_node_loss", "latest training loss of an origin", labels=labels)
    val_loss = GaugeMetricFamily("lowband_node_val_loss", "latest validation loss of an origin", labels=labels)
    sent = CounterMetricFamily("lowband_node_bytes_sent", "bytes the node sent, by kind", labels=[*labels, "kind"])
    rejected = CounterMetricFamily("lowband_rejected_updates",
                                   "peers' pseudo-gradient parts the node refused as a shard owner", labels=labels)
    for n in nodes:
        key = [n["node_id"], str(n["stage"])]
        for field, family in gauges.items():
            family.add_metric(key, n[field])
        if n["stage"] == 0 and n["step"] > 0:
            loss.add_metric(key, n["loss"])
            if n["val_loss"] > 0:
                val_loss.add_metric(key, n["val_loss"])
        for kind in KINDS:
            sent.add_metric([*key, kind], n["bytes_sent_by_kind"][kind])
        rejected.add_metric(key, n["rejected_updates"])
    yield from gauges.values()
    yield from (loss, val_loss, sent, rejected)


def _round_metrics(rounds: list[dict[str, Any]]) -> Iterator[Metric]:
    formed = CounterMetricFamily("lowband_sync_rounds_formed", "sync rounds formed", labels=["stage", "fragment"])
    failed = CounterMetricFamily("lowband_sync_rounds_failed", "sync rounds abandoned without a quorum",
                                 labels=["stage", "fragment"])
    for r in rounds:
        key = [str(r["stage"]), str(r["fragment"])]
        formed.add_metric(key, r["formed"])
        failed.add_metric(key, r["failed"])
    yield formed
    yield failed


def registry_for(watch: RunWatch) -> CollectorRegistry:
    """A registry of its own (not the process-global one): only the run's metrics, once per coordinator."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(watch))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(registry)
