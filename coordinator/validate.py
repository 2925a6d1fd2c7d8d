"""Field checks for every coordinator request; each raises InvalidRequest naming the field."""

from __future__ import annotations

import math
import re

from lowband.coordinator.errors import InvalidRequest
from lowband.protocols import coordinator_pb2 as pb

MAX_ID = 64
MAX_SHORT = 128
MAX_TEXT = 1024
MAX_LINKS = 10_000
MAX_SYNC_MADDRS = 8        # a DHT listens on a few addresses (one per interface and transport)
MAX_MADDR = 256
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])\Z")


def node_id(value: str, name: str = "node_id") -> str:
    if not value:
        raise InvalidRequest(f"{name} is empty")
    if len(value) > MAX_ID or not _ID_RE.match(value):
        raise InvalidRequest(f"{name} {value[:MAX_ID]!r} is not a valid node id "
                             f"(letters, digits, '._:-', at most {MAX_ID} characters)")
    return value


def text(value: str, name: str, limit: int = MAX_SHORT, required: bool = False) -> str:
    if required and not value:
        raise InvalidRequest(f"{name} is empty")
    if len(value) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} characters")
    return value


def address(value: str, name: str = "address") -> str:
    """host:port with a port in 1..65535 ([v6]:port accepted)."""
    if not value:
        raise InvalidRequest(f"{name} is empty")
    if len(value) > 260:
        raise InvalidRequest(f"{name} is longer than 260 characters")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not _HOST_RE.match(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidRequest(f"{name} {value!r} is not host:port with a port in 1..65535")
    return value


def number(value: float, name: str, *, positive: bool = False) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise InvalidRequest(f"{name} must be > 0, got {value}")
    if value < 0:
        raise InvalidRequest(f"{name} must be >= 0, got {value}")
    return value


def stage(value: int, num_stages: int, name: str = "stage", allow_none: bool = False) -> int:
    if allow_none and value == -1:
        return value
    if not 0 <= value < num_stages:
        lo = "-1 (none) or " if allow_none else ""
        raise InvalidRequest(f"{name} {value} out of range: must be {lo}0..{num_stages - 1}")
    return value


def metrics(m: pb.NodeMetrics) -> None:
    """Non-negative, finite numbers only (one broken node must not poison the status or the planner)."""
    if m.step < 0 or m.outer_step < 0:
        raise InvalidRequest(f"metrics.step/outer_step must be >= 0, got {m.step}/{m.outer_step}")
    for name, value in (("loss", m.loss), ("tokens_per_s", m.tokens_per_s), ("grad_norm", m.grad_norm),
                        ("val_loss", m.val_loss)):
        if not (value >= 0.0 and value < math.inf):  # also rejects NaN
            raise InvalidRequest(f"metrics.{name} must be finite and >= 0, got {value}")


def join(req: pb.JoinRequest, num_stages: int) -> None:
    if req.node_id:
        node_id(req.node_id)
    address(req.address)
    text(req.device, "device", required=True)
    text(req.version, "version", required=True)
    number(req.throughput, "throughput", positive=True)
    stage(req.stage, num_stages, "stage", allow_none=True)
    stage(req.preferred_stage, num_stages, "preferred_stage", allow_none=True)
    if req.stage == 0 and not req.has_data:
        raise InvalidRequest("stage 0 hosts the data (origins): a node without has_data cannot hold it")


def heartbeat(req: pb.HeartbeatRequest) -> None:
    node_id(req.node_id)
    metrics(req.metrics)


def leave(req: pb.LeaveRequest) -> None:
    node_id(req.node_id)
    text(req.reason, "reason", MAX_TEXT)
    if req.HasField("metrics"):
        metrics(req.metrics)


def sync_round(req: pb.SyncRoundRequest, num_stages: int, fragments: int) -> None:
    node_id(req.node_id)
    stage(req.stage, num_stages)
    if not 0 <= req.fragment < fragments:
        raise InvalidRequest(f"fragment {req.fragment} out of range: must be 0..{fragments - 1}")
    if req.outer_step < 0:
        raise InvalidRequest(f"outer_step must be >= 0, got {req.outer_step}")
    if len(req.sync_maddrs) > MAX_SYNC_MADDRS:
        raise InvalidRequest(f"sync_maddrs: at most {MAX_SYNC_MADDRS} multiaddrs, got {len(req.sync_maddrs)}")
    for i, maddr in enumerate(req.sync_maddrs):
        text(maddr, f"sync_maddrs[{i}]", MAX_MADDR, required=True)
        if not maddr.startswith("/") or not maddr.isprintable() or " " in maddr:
            raise InvalidRequest(f"sync_maddrs[{i}] {maddr[:MAX_MADDR]!r} is not a multiaddr (/ip4/.../tcp/...)")


def failure(req: pb.FailureReport) -> None:
    node_id(req.reporter_id, "reporter_id")
    node_id(req.suspect_id, "suspect_id")
    text(req.reason, "reason", MAX_TEXT)


def links(req: pb.LinkReport) -> None:
    node_id(req.node_id)
    if len(req.links) > MAX_LINKS:
        raise InvalidRequest(f"links: at most {MAX_LINKS} measurements per report, got {len(req.links)}")
    for i, link in enumerate(req.links):
        node_id(link.peer_id, f"links[{i}].peer_id")
        if link.peer_id == req.node_id:
            raise InvalidRequest(f"links[{i}].peer_id is the reporting node itself")
        number(link.rtt_s, f"links[{i}].rtt_s")
        number(link.bandwidth_bytes_per_s, f"links[{i}].bandwidth_bytes_per_s")


def recovery(req: pb.RecoveryReport) -> None:
    node_id(req.node_id)
    if req.plan_id == 0:
        raise InvalidRequest("plan_id must be set (> 0)")
    text(req.message, "message", MAX_TEXT)


def status(req: pb.StatusRequest) -> None:
    if not 0 <= req.max_events <= 10_000:
        raise InvalidRequest(f"max_events must be in 0..10000, got {req.max_events}")
