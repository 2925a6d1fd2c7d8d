"""Synthetic topologies for evaluating SkipPipe planners without training.

``make_topology(kind, nodes, stages, seed)`` returns a
:class:`lowband.coordinator.skippipe.paths.Topology`. Nodes are spread over the stages as
evenly as possible (stage 0, the origins, gets the first extra node), in a
random order so replicas of a stage land in different places.

Regime (documented so the numbers can be compared with the SkipPipe paper's
20-node, 6-stage geo-distributed setting): a ~1.3B-parameter LLaMA-style model
(24 layers, hidden 2048) on consumer/older datacenter GPUs, microbatches of
4 x 2048 tokens, activations in bf16:

* ``DEFAULT_COMPUTE_S_PER_LAYER`` — forward seconds per layer per microbatch
  (~0.8 TFLOP per layer at a few tens of effective TFLOP/s, with overheads);
* ``DEFAULT_TOTAL_LAYERS`` — layers of the model, split over the S-1 block stages;
* activations/gradients per hop: ``lowband.coordinator.skippipe.paths.DEFAULT_ACTIVATION_BYTES``
  (32 MiB).

Kinds:

* ``uniform`` — every pair 50 ms / 0.1 GB/s, identical GPUs;
* ``geo`` — nodes in ~12 regions placed at random on a globe; between regions
  latency 10-300 ms with distance and bandwidth 0.25 down to 0.01 GB/s
  (log-scale with distance, +-20% noise); within a region 1 ms and 1-10 GB/s;
  identical GPUs;
* ``hetero`` — per-pair latency 5-100 ms, per-node uplinks 0.02-1 GB/s
  (a link runs at the slower end), and four GPU classes 1x/1.5x/2x/3x slower.
"""

from __future__ import annotations

import numpy as np

from lowband.coordinator.skippipe.paths import NodeSpec, PlanError, Topology

KINDS = ("uniform", "geo", "hetero")
DEFAULT_COMPUTE_S_PER_LAYER = 0.05
DEFAULT_TOTAL_LAYERS = 24
GEO_REGIONS = 12


def assign_stages(nodes: int, stages: int, rng: np.random.Generator) -> list[int]:
    """Stage of each node: counts differ by at most one, stage 0 first to get extras."""
    if nodes < stages:
        raise PlanError(f"need at least one node per stage: {nodes} nodes for {stages} stages")
    order = rng.permutation(nodes)
    stage = [0] * nodes
    for rank, node in enumerate(order.tolist()):
        stage[node] = rank % stages
    return stage


def _symmetric(mat: np.ndarray) -> np.ndarray:
    upper = np.triu(mat, 1)
    return upper + upper.T


def make_topology(kind: str, nodes: int, stages: int, seed: int = 0, *,
                  compute_s_per_layer: float = DEFAULT_COMPUTE_S_PER_LAYER,
                  regions: int = GEO_REGIONS) -> Topology:
    """Generate a topology of ``kind`` with ``nodes`` nodes serving ``stages`` stages."""
    if kind not in KINDS:
        raise PlanError(f"unknown topology {kind!r}; choose one of {KINDS}")
    if stages < 2:
        raise PlanError(f"stages must be >= 2, got {stages}")
    rng = np.random.default_rng(seed)
    stage_of = assign_stages(nodes, stages, rng)
    speed = np.full(nodes, compute_s_per_layer)
    region_of: list[int] | None = None
    if kind == "uniform":
        latency = np.full((nodes, nodes), 0.05)
        bandwidth = np.full((nodes, nodes), 0.1e9)
    elif kind == "geo":
        nreg = max(1, min(regions, nodes))
        z = rng.uniform(-1.0, 1.0, nreg)          # uniform points on a sphere
        phi = rng.uniform(0.0, 2 * np.pi, nreg)
        r = np.sqrt(1.0 - z**2)
        xyz = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
        angle = np.arccos(np.clip(xyz @ xyz.T, -1.0, 1.0)) / np.pi   # 0..1 of half the globe
        reg_lat = 0.010 + 0.290 * angle
        reg_bw = 0.25e9 * (0.04 ** angle) * rng.uniform(0.8, 1.2, (nreg, nreg))
        reg_bw = np.clip(_symmetric(reg_bw), 0.01e9, 0.25e9)
        region = rng.integers(0, nreg, nodes)
        region_of = region.tolist()
        latency = reg_lat[np.ix_(region, region)]
        bandwidth = reg_bw[np.ix_(region, region)]
        same = region[:, None] == region[None, :]
        local_bw = _symmetric(rng.uniform(1e9, 10e9, (nodes, nodes)))
        latency = np.where(same, 0.001, latency)
        bandwidth = np.where(same, local_bw, bandwidth)
    else:  # hetero
        latency = _symmetric(rng.uniform(0.005, 0.100, (nodes, nodes)))
        uplink = np.exp(rng.uniform(np.log(0.02e9), np.log(1e9), nodes))
        bandwidth = np.minimum(uplink[:, None], uplink[None, :])
        speed = compute_s_per_layer * rng.choice([1.0, 1.5, 2.0, 3.0], nodes)
    np.fill_diagonal(latency, 0.0)
    np.fill_diagonal(bandwidth, np.inf)
    width = len(str(nodes - 1))
    specs = [NodeSpec(f"n{i:0{width}d}", stage_of[i], float(speed[i])) for i in range(nodes)]
    return Topology(specs, latency, bandwidth, region_of)
