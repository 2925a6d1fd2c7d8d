"""`lowband-sim schedule`: compare SkipPipe path planners on a generated topology, without training.

Each planner plans one iteration; the discrete-event simulator
(``lowband.coordinator.skippipe.makespan``) scores it. ``skippipe-noskip`` is the skippipe
planner at skip ratio 0, to separate what routing gains from what skipping
gains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from typing import Any

from lowband.coordinator.skippipe.makespan import simulate
from lowband.coordinator.skippipe.paths import (
    DEFAULT_ACTIVATION_BYTES,
    PlanError,
    PlanRequest,
    stage_coverage,
)
from lowband.coordinator.skippipe.planner import PLANNERS, plan_paths
from lowband.sim.topology import DEFAULT_COMPUTE_S_PER_LAYER, DEFAULT_TOTAL_LAYERS, KINDS, make_topology

log = logging.getLogger(__name__)

DEFAULT_PLANNERS = ("full", "random", "skippipe-unaware", "skippipe", "skippipe-noskip")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("schedule", help="evaluate SkipPipe path planners on a generated topology",
                              description=__doc__.splitlines()[0])
    p.add_argument("--topology", choices=KINDS, default="geo")
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--stages", type=int, default=6, help="S, including stage 0 (embedding + head)")
    p.add_argument("--skip", type=float, default=0.33, help="skip ratio k")
    p.add_argument("--microbatches", type=int, default=4, help="microbatches per origin per iteration")
    p.add_argument("--seed", type=int, default=0, help="seeds the topology and the planners")
    p.add_argument("--memory-cap", type=int, default=0, help="microbatches a node may hold; 0 = unbounded")
    p.add_argument("--swap-edges", action="store_true", help="CheckFree+ edge swaps on half the microbatches")
    p.add_argument("--layers", type=float, default=DEFAULT_TOTAL_LAYERS,
                   help="model layers, split evenly over the S-1 block stages")
    p.add_argument("--activation-mib", type=float, default=DEFAULT_ACTIVATION_BYTES / 2**20,
                   help="activation (and gradient) MiB per microbatch hop")
    p.add_argument("--compute-s-per-layer", type=float, default=DEFAULT_COMPUTE_S_PER_LAYER,
                   help="forward seconds per layer per microbatch (base GPU)")
    p.add_argument("--planners", default=",".join(DEFAULT_PLANNERS),
                   help=f"comma-separated, from {', '.join((*PLANNERS, 'skippipe-noskip'))}")
    p.add_argument("--search-evals", type=int, default=None,
                   help="skippipe local-search simulator runs (default: sized to the problem)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Plan and simulate every requested planner; the result is what ``--json`` prints."""
    names = [n.strip() for n in args.planners.split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANNERS and n != "skippipe-noskip"]
    if unknown:
        raise PlanError(f"--planners: unknown planner {unknown[0]!r}")
    if args.nodes < args.stages:
        raise PlanError(f"--nodes {args.nodes} is fewer than --stages {args.stages}")
    topo = make_topology(args.topology, args.nodes, args.stages, args.seed,
                         compute_s_per_layer=args.compute_s_per_layer)
    request = PlanRequest(
        topology=topo, num_stages=args.stages, skip_ratio=args.skip,
        microbatches_per_origin=args.microbatches, memory_cap=args.memory_cap,
        layers_per_stage=args.layers / (args.stages - 1), activation_bytes=args.activation_mib * 2**20,
        seed=args.seed, swap_edges=args.swap_edges, search_evals=args.search_evals)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        noskip = name == "skippipe-noskip"
        start = time.perf_counter()
        try:
            req = dataclasses.replace(request, skip_ratio=0.0) if noskip else request
            paths = plan_paths(req, "skippipe" if noskip else name)
        except PlanError as exc:  # e.g. a memory cap that only the skipping planners can meet
            results[name] = {"error": str(exc)}
            log.warning("%s: %s", name, exc)
            continue
        plan_s = time.perf_counter() - start
        sim = simulate(paths, req)
        coverage = stage_coverage(paths, args.stages)
        results[name] = {
            "iteration_s": round(sim.makespan_s, 4),
            "plan_s": round(plan_s, 4),
            "queue_wait_s": round(sim.wait_s, 4),
            "coverage_min_max": [min(coverage), max(coverage)],
        }
        log.info("%s: iteration %.2f s (planned in %.2f s)", name, sim.makespan_s, plan_s)
    out: dict[str, Any] = {
        "topology": args.topology, "nodes": args.nodes, "stages": args.stages, "skip": args.skip,
        "microbatches_per_origin": args.microbatches, "origins": len(topo.origins()),
        "visits_per_path": request.visits, "seed": args.seed, "swap_edges": args.swap_edges,
        "planners": results,
    }
    ok = {name for name, res in results.items() if "error" not in res}
    for base in ("full", "random"):
        if {"skippipe", base} <= ok:
            out[f"skippipe_vs_{base}"] = round(results["skippipe"]["iteration_s"] / results[base]["iteration_s"], 4)
    if "skippipe" in ok:
        out["plan_s"] = results["skippipe"]["plan_s"]
    return out


def run(args: argparse.Namespace) -> int:
    try:
        out = evaluate(args)
    except PlanError as exc:
        print(f"lowband-sim schedule: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"{args.topology} topology, {args.nodes} nodes, {args.stages} stages, skip {args.skip} "
          f"({out['visits_per_path']} of {args.stages - 1} block stages per path), "
          f"{out['origins']} origins x {args.microbatches} microbatches, seed {args.seed}")
    full = out["planners"].get("full", {}).get("iteration_s")
    print(f"{'planner':<18}{'iteration s':>12}{'vs full':>9}{'plan s':>9}")
    for name, res in out["planners"].items():
        if "error" in res:
            print(f"{name:<18}  cannot plan: {res['error']}")
            continue
        ratio = f"{res['iteration_s'] / full:.3f}" if full else "-"
        print(f"{name:<18}{res['iteration_s']:>12.2f}{ratio:>9}{res['plan_s']:>9.2f}")
    return 0
