"""From membership to a path plan: snapshot the inputs, call the SkipPipe planner, fall back if it cannot.

`PlanInputs` is an immutable snapshot taken on the event loop; `compute_plan`
is pure, so the server runs it in a worker thread (a large SkipPipe search
must not stall heartbeats). The planner is coordinator/skippipe/planner.py
`plan_paths`; if it raises PlanError (e.g. a stage has no replica, or a
memory cap cannot be met) the full-pipeline fallback in schedule.py is used
(not the planner's ``full`` mode: that one obeys the same rules, so it can fail too).
With ``model.stages = 1`` (data-parallel mode) the planner is bypassed: every
path is its origin alone. Unless ``skippipe.memory_cap`` is set, the planner's
per-node cap comes from the free memory nodes reported (``memory_cap``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass

import numpy as np

from lowband.coordinator.skippipe.paths import NodeSpec, PlanError, PlannedPath, PlanRequest, Topology
from lowband.coordinator.skippipe.planner import plan_paths
from lowband.coordinator.skippipe.schedule import Plan, count_visits, full_pipeline_paths
from lowband.protocols.config import RunConfig
from lowband.protocols.hop_bytes import hop_bytes_per_position
from lowband.protocols.stage_memory import microbatches_that_fit, uses_bf16

logger = logging.getLogger(__name__)

# Model width per preset, only to estimate activation bytes per hop for the cost model
# (the coordinator does not import node/). A wrong guess changes plan quality, never correctness.
_PRESET_DIM = {"tiny": 128, "small": 256, "124m": 768, "500m": 1280, "1.5b": 2304}
_BYTE_VOCAB = 256   # model.vocab_size = 0 before the run resolves it: the byte-level default
DEFAULT_ONE_WAY_LATENCY_S = 0.005
DEFAULT_BANDWIDTH_BPS = 125e6   # 1 Gbit/s, until nodes report their links


@dataclass(frozen=True, slots=True)
class PlanInputs:
    epoch: int
    config: RunConfig
    nodes: tuple[tuple[str, int, float], ...]                   # (node_id, stage, throughput), routable only
    links: tuple[tuple[str, str, float, float], ...] = ()        # (from, to, rtt_s, bandwidth B/s)
    memory: tuple[tuple[str, str, int], ...] = ()                # (node_id, device, free bytes at join; 0: unknown)


def memory_cap(inputs: PlanInputs) -> int:
    """The planner's per-node cap on microbatches held at once: ``skippipe.memory_cap`` when set, else
    what the tightest node's reported free memory holds beside its stage (protocols/stage_memory.py), 0
    (no cap) when no node reported any. Never below what the pipeline needs to run at all (each stage's
    share of the iteration's microbatches): a tighter cap would fail every plan, so it is raised to that
    and logged (the estimate is on the high side; the node may still fit)."""
    cfg = inputs.config
    if cfg.skippipe.memory_cap > 0:
        return cfg.skippipe.memory_cap
    stage_of = {node_id: stage for node_id, stage, _ in inputs.nodes}
    caps = {node_id: microbatches_that_fit(cfg, stage_of[node_id], free, bf16=uses_bf16(cfg.train.precision, device))
            for node_id, device, free in inputs.memory if free > 0 and node_id in stage_of}
    if not caps:
        return 0
    tightest = min(caps, key=lambda n: (caps[n], n))
    cap = caps[tightest]
    replicas = [sum(1 for s in stage_of.values() if s == stage) for stage in range(cfg.model.stages)]
    origins = replicas[0] if replicas else 0
    per_iteration = origins * cfg.train.microbatches
    floor = max([cfg.train.microbatches, *(math.ceil(per_iteration / r) for r in replicas[1:] if r > 0)])
    if cap < floor:
        logger.warning("node %s's free memory holds %d microbatches at once, below the %d the pipeline needs; "
                       "planning with %d", tightest, cap, floor, floor)
        return floor
    return cap

def activation_bytes(config: RunConfig) -> float:
    """Bytes one hop's payload costs, the mean of its two directions (the planner charges a hop one size):
    what the configured codecs send, a subspace codec's coordinates and token ids included."""
    dim = _PRESET_DIM.get(config.model.preset, 768)
    train, vocab = config.train, config.model.vocab_size or _BYTE_VOCAB
    forward = hop_bytes_per_position(train.activation_codec, dim, config.model.subspace_rank, vocab, forward=True)
    backward = hop_bytes_per_position(train.gradient_codec or train.activation_codec, dim,
                                      config.model.subspace_rank, vocab, forward=False)
    return train.microbatch_size * config.model.seq_len * (forward + backward) / 2


def topology(inputs: PlanInputs) -> Topology:
    """Live nodes and the measured link matrix; unmeasured links get the median of measured ones."""
    index = {node_id: i for i, (node_id, _, _) in enumerate(inputs.nodes)}
    n = len(index)
    mb = inputs.config.train.microbatch_size
    specs = [NodeSpec(node_id, stage, mb / max(tp, 1e-9)) for node_id, stage, tp in inputs.nodes]
    known = [(index[a], index[b], rtt / 2.0, bw) for a, b, rtt, bw in inputs.links if a in index and b in index]
    lat_default = statistics.median([x[2] for x in known]) if known else DEFAULT_ONE_WAY_LATENCY_S
    bws = [x[3] for x in known if x[3] > 0]
    bw_default = statistics.median(bws) if bws else DEFAULT_BANDWIDTH_BPS
    latency = np.full((n, n), lat_default)
    bandwidth = np.full((n, n), bw_default)
    # A one-sided measurement stands for both directions; a measurement of the direction itself wins.
    for directed in (False, True):
        for i, j, lat, bw in known:
            a, b = (i, j) if directed else (j, i)
            latency[a, b] = lat
            if bw > 0:
                bandwidth[a, b] = bw
    np.fill_diagonal(latency, 0.0)
    return Topology(nodes=specs, latency_s=latency, bandwidth_Bps=bandwidth)


def compute_plan(inputs: PlanInputs) -> Plan:
    """Every origin's paths for this epoch (pure; safe to run in a worker thread)."""
    cfg = inputs.config
    num_stages = cfg.model.stages
    stages = {stage for _, stage, _ in inputs.nodes}
    if not inputs.nodes or any(s not in stages for s in range(num_stages)):
        return Plan()
    if num_stages == 1:   # data-parallel mode: no pipeline, so no SkipPipe search (paths are the origins)
        return fallback_plan(inputs)
    try:
        section = dataclasses.replace(cfg.skippipe, memory_cap=memory_cap(inputs))
        request = PlanRequest.from_section(
            topology(inputs), section, num_stages=num_stages,
            microbatches_per_origin=cfg.train.microbatches, activation_bytes=activation_bytes(cfg),
            seed=cfg.seed + inputs.epoch,
            swap_edges=cfg.recovery.swap_edges and cfg.recovery.method == "checkfree-plus" and num_stages >= 4)
        planned = plan_paths(request, cfg.skippipe.planner)
    except PlanError as exc:
        logger.warning("planner %r failed for epoch %d (%s): using full-pipeline paths",
                       cfg.skippipe.planner, inputs.epoch, exc)
        return fallback_plan(inputs)
    paths: dict[str, list[PlannedPath]] = {}
    for p in planned:
        paths.setdefault(p.origin_id, []).append(p)
    return Plan(paths=paths, visits=count_visits(paths))


def fallback_plan(inputs: PlanInputs) -> Plan:
    """Full-pipeline paths balanced by throughput and link latency: a plan whenever every stage has a node."""
    cfg = inputs.config
    replicas: dict[int, list[str]] = {}
    for node_id, stage, _ in inputs.nodes:
        replicas.setdefault(stage, []).append(node_id)
    throughput = {node_id: tp for node_id, _, tp in inputs.nodes}
    rtt = {(a, b): r for a, b, r, _ in inputs.links}
    paths = full_pipeline_paths(sorted(replicas.get(0, [])), replicas, throughput, cfg.model.stages,
                                cfg.train.microbatches, rtt, cfg.train.microbatch_size)
    return Plan(paths=paths, visits=count_visits(paths))
