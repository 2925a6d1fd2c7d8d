"""SkipPipe path planners: which stages each microbatch visits, in what order, on which replica.

Call :func:`plan_paths` with a :class:`~coordinator.paths.PlanRequest`; every
planner returns a plan that passes :func:`~coordinator.paths.validate_plan`,
sorted by (origin in topology order, microbatch).

* ``full`` — the baseline: every stage, replicas taken round robin so each
  replica of a stage gets the same number of microbatches. (The coordinator's
  fallback, ``schedule.full_pipeline_paths``, also visits every stage but balances
  by throughput and link latency and obeys no rule, so that it cannot fail.)
* ``random`` — random valid skips (still evenly covering the stages), random
  adjacent swaps, random replicas.
* ``skippipe-unaware`` — the skips below, each path routed to the replicas
  with the cheapest links and compute, with replica loads balanced but no
  notion of time (the paper's "collision-unaware" ablation).
* ``skippipe`` — collision-aware: stage sets from a balanced family (every
  stage visited equally), paths inserted one by one into a reservation table of
  node busy intervals, each routed by a dynamic programme over replicas that
  minimises its estimated forward completion plus the static cost of its
  backward; a few randomised restarts (path order, which path gets which stage
  set) are scored with the exact simulator (``lowband.coordinator.skippipe.makespan``), and the
  best is refined by local search (move a hop to another replica, trade stages
  or whole routes between paths, toggle adjacent swaps), again scored by the
  simulator. All budgets are counts, never wall time, so a seed gives one plan.

With ``swap_edges`` (CheckFree+), every other path in output order runs stages
1<->2 and S-2<->S-1 swapped; the planners first trade stages between paths
(keeping coverage even) so that those paths visit the edge pairs.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lowband.coordinator.skippipe.makespan import CostModel, simulate_steps
from lowband.coordinator.skippipe.paths import (
    NodeSpec,
    PlanError,
    PlannedPath,
    PlanRequest,
    Topology,
    edge_swap_kinds,
    edge_swap_sequence,
    validate_plan,
)
from lowband.coordinator.skippipe.schedule import greedy_routes

__all__ = [
    "PLANNERS",
    "NodeSpec",
    "PlanError",
    "PlanRequest",
    "PlannedPath",
    "Topology",
    "plan_paths",
]

log = logging.getLogger(__name__)


# --- stage sets ------------------------------------------------------------------------------------

def _valid(blocks: Sequence[int], S: int, m: int, max_swaps: int, J: int) -> bool:
    """Fast boolean form of ``paths.check_stage_sequence``."""
    if len(blocks) != m or len(set(blocks)) != m:
        return False
    hi = 0
    swaps = 0
    for s in blocks:
        if s < 1 or s >= S:
            return False
        if s > hi:
            if s - hi > J + 1:
                return False
            hi = s
        else:
            if s != hi - 1:
                return False
            swaps += 1
            if swaps > max_swaps:
                return False
    return S - 1 - hi <= J


def _balanced_sets(P: int, S: int, m: int, J: int, rng: random.Random) -> list[list[int]]:
    """P sorted stage sets of size m over 1..S-1, each stage in floor/ceil(P*m/(S-1)) of them.

    Rotations of the balanced (Christoffel) word with m ones in n = S-1 places:
    any run of consecutive rotations covers every position equally up to 1, and
    its zero runs have length ceil((n-m)/m) at most, which ``PlanRequest``
    bounds by max_jump, so every rotation obeys the jump rule.
    """
    n = S - 1
    word = [(j + 1) * m // n - j * m // n for j in range(n)]
    rotations = [[j + 1 for j in range(n) if word[(j + r) % n]] for r in range(n)]
    bad = [rot for rot in rotations if not _valid(rot, S, m, 0, J)]
    if bad:
        raise PlanError(f"stage set {bad[0]} breaks the jump rule (max_jump={J})")
    start = rng.randrange(n)
    sets = [list(rotations[(start + p) % n]) for p in range(P)]
    rng.shuffle(sets)
    return sets


# --- internal plan state ---------------------------------------------------------------------------

@dataclass(slots=True)
class _Plan:
    origins: list[int]           # node index of each path's origin
    mbs: list[int]
    blocks: list[list[int]]      # visiting order of block stages
    hops: list[list[int]]        # node index per block stage
    locked: list[tuple[str, ...]]  # edge swaps a path carries (order and set then fixed)

    def copy(self) -> _Plan:
        return _Plan(list(self.origins), list(self.mbs), [list(b) for b in self.blocks],
                     [list(h) for h in self.hops], list(self.locked))


class _Ctx:
    """Request-derived data shared by the planners."""

    def __init__(self, request: PlanRequest) -> None:
        self.req = request
        self.topo = request.topology
        self.S = request.num_stages
        self.m = request.visits
        self.J = request.max_jump
        self.max_swaps = request.max_swaps
        self.cost = CostModel(request)
        self.replicas = [self.topo.replicas(s) for s in range(self.S)]
        self.replicas_np = [np.asarray(r, dtype=np.int64) for r in self.replicas]
        self.M = request.microbatches_per_origin
        self.origin_nodes = self.topo.origins()
        self.P = len(self.origin_nodes) * self.M
        self.cap = request.memory_cap if request.memory_cap > 0 else 1 << 30
        self.origins = [o for o in self.origin_nodes for _ in range(self.M)]
        self.mbs = [mb for _ in self.origin_nodes for mb in range(self.M)]

    def simulate(self, plan: _Plan) -> tuple[float, float]:
        nodes, durs = zip(*(self.cost.steps(o, h) for o, h in zip(plan.origins, plan.hops, strict=True)),
                          strict=True)
        res = simulate_steps(nodes, durs, self.cost.link, len(self.topo.nodes))
        return res.makespan_s, sum(res.finish_s)

    def to_paths(self, plan: _Plan) -> list[PlannedPath]:
        ids = [spec.node_id for spec in self.topo.nodes]
        return [PlannedPath(ids[o], mb, (0, *b, 0), (ids[o], *(ids[h] for h in hs), ids[o]))
                for o, mb, b, hs in zip(plan.origins, plan.mbs, plan.blocks, plan.hops, strict=True)]


def _edge_locks(ctx: _Ctx, sets: list[list[int]], rng: random.Random) -> list[tuple[str, ...]]:
    """Pick every other path for CheckFree+ edge swaps and trade stages so they hold the pairs.

    Mutates ``sets`` (coverage is preserved: every trade moves one visit of a
    stage from one path to another and one visit of another stage back).
    Returns the swaps each path carries; () for unswapped paths.
    """
    S, m, J = ctx.S, ctx.m, ctx.J
    locks: list[tuple[str, ...]] = [()] * len(sets)
    if not ctx.req.swap_edges:
        return locks
    cycle = edge_swap_kinds(S, m)
    if not cycle[0]:
        return locks
    selected = [p for p in range(len(sets)) if p % 2 == 1]
    free = [p for p in range(len(sets)) if p % 2 == 0]
    for j, p in enumerate(selected):
        kinds = cycle[j % len(cycle)]
        need: list[int] = []
        if "front" in kinds:
            need += [1, 2]
        if "back" in kinds:
            need += [S - 2, S - 1]
        for r in need:
            if r in sets[p]:
                continue
            order = list(free)
            rng.shuffle(order)
            done = False
            for q in order:
                if r not in sets[q]:
                    continue
                for x in sorted(sets[p]):
                    if x in need or x in sets[q]:
                        continue
                    new_p = sorted([s for s in sets[p] if s != x] + [r])
                    new_q = sorted([s for s in sets[q] if s != r] + [x])
                    if _valid(new_q, S, m, 0, J) and _valid(new_p, S, m, 0, J):
                        sets[p], sets[q] = new_p, new_q
                        done = True
                        break
                if done:
                    break
        swapped = edge_swap_sequence(sets[p], S, kinds)
        if swapped is not None and _valid(swapped, S, m, ctx.max_swaps, J):
            sets[p] = swapped
            locks[p] = kinds
    return locks


# --- reservation table -----------------------------------------------------------------------------

class _Timeline:
    """Per-node sorted busy intervals; jobs go into the first gap that fits."""

    def __init__(self, num_nodes: int) -> None:
        self.starts: list[list[float]] = [[] for _ in range(num_nodes)]
        self.ends: list[list[float]] = [[] for _ in range(num_nodes)]

    def earliest(self, node: int, t: float, dur: float) -> float:
        starts, ends = self.starts[node], self.ends[node]
        i = bisect.bisect_right(ends, t)
        cand = t
        while i < len(starts):
            if cand + dur <= starts[i]:
                return cand
            if ends[i] > cand:
                cand = ends[i]
            i += 1
        return cand

    def reserve(self, node: int, start: float, dur: float) -> None:
        if dur <= 0:
            return
        i = bisect.bisect_right(self.starts[node], start)
        self.starts[node].insert(i, start)
        self.ends[node].insert(i, start + dur)


def _route(ctx: _Ctx, origin: int, blocks: Sequence[int], usage: list[int],
           timeline: _Timeline | None, load_cap: Sequence[int] | None = None) -> tuple[list[int], float]:
    """Choose a replica per hop by dynamic programming over the layered replica graph.

    Time-aware when ``timeline`` is given (forward start times from the
    reservation table), else static costs only. The objective is the forward
    completion at the origin plus the static cost of the backward over the same
    nodes and links. Returns (nodes, objective).
    """
    link, fwd, b = ctx.cost.link_np, ctx.cost.fwd, ctx.cost.bwd_factor
    prev = np.asarray([origin], dtype=np.int64)
    fin = np.zeros(1)
    bacc = np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for s in blocks:
        cand = ctx.replicas_np[s]
        limit = ctx.cap if load_cap is None else min(ctx.cap, load_cap[s])
        ok = [usage[c] < limit for c in cand.tolist()]
        if not all(ok):
            cand = cand[np.asarray(ok, dtype=bool)]
            if cand.size == 0:  # load cap exhausted: fall back to the hard memory cap
                cand = ctx.replicas_np[s][[usage[c] < ctx.cap for c in ctx.replicas_np[s].tolist()]]
        sub = link[np.ix_(prev, cand)]                       # (R_prev, R_cand)
        key = (fin + bacc)[:, None] + 2.0 * sub
        arg = key.argmin(axis=0)
        cols = np.arange(cand.size)
        arrive = fin[arg] + sub[arg, cols]
        cf = ctx.cost.fwd_np[cand]
        if timeline is None:
            fin = arrive + cf
        else:
            fin = np.asarray([timeline.earliest(c, a, f) + f
                              for c, a, f in zip(cand.tolist(), arrive.tolist(), cf.tolist(), strict=True)])
        bacc = bacc[arg] + sub[arg, cols] + b * cf
        trail.append((cand, arg))
        prev = cand
    back = link[prev, origin]
    total = fin + bacc + 2.0 * back + fwd[origin] * (1.0 + b)
    j = int(total.argmin())
    objective = float(total[j])
    nodes: list[int] = []
    for cand, arg in reversed(trail):
        nodes.append(int(cand[j]))
        j = int(arg[j])
    nodes.reverse()
    return nodes, objective


def _reserve_path(ctx: _Ctx, timeline: _Timeline, origin: int, hops: Sequence[int]) -> None:
    """Put one path's jobs (forward, head, backward) into the reservation table."""
    nodes, durs = ctx.cost.steps(origin, hops)
    link = ctx.cost.link
    t = 0.0
    prev = nodes[0]
    for k, (node, dur) in enumerate(zip(nodes, durs, strict=True)):
        if k:
            t += link[prev][node]
        start = timeline.earliest(node, t, dur)
        timeline.reserve(node, start, dur)
        t = start + dur
        prev = node


# --- planners --------------------------------------------------------------------------------------

def _priority(ctx: _Ctx) -> list[int]:
    """Paths in the order they enter the pipeline: microbatch 0 of every origin first."""
    return sorted(range(ctx.P), key=lambda p: (ctx.mbs[p], p))


def _plan_full(ctx: _Ctx, rng: random.Random) -> _Plan:
    """The baseline: every stage, each stage's replicas round robin (the coordinator's throughput-aware
    fallback is ``schedule.full_pipeline_paths``; both route with ``schedule.greedy_routes``)."""
    sets = [list(range(1, ctx.S)) for _ in range(ctx.P)]
    locks = _edge_locks(ctx, sets, rng)
    order = _priority(ctx)
    routes = greedy_routes([(ctx.origins[p], sets[p]) for p in order], dict(enumerate(ctx.replicas)),
                           lambda _prev, _node, load: load)
    hops: list[list[int]] = [[] for _ in range(ctx.P)]
    for p, route in zip(order, routes, strict=True):
        hops[p] = route
    return _Plan(list(ctx.origins), list(ctx.mbs), sets, hops, locks)


def _random_swaps(ctx: _Ctx, blocks: list[int], rng: random.Random) -> list[int]:
    out = list(blocks)
    for i in range(len(out) - 1):
        if out[i + 1] == out[i] + 1 and rng.random() < 0.25:
            trial = list(out)
            trial[i], trial[i + 1] = trial[i + 1], trial[i]
            if _valid(trial, ctx.S, ctx.m, ctx.max_swaps, ctx.J):
                out = trial
    return out


def _plan_random(ctx: _Ctx, rng: random.Random) -> _Plan:
    sets = _balanced_sets(ctx.P, ctx.S, ctx.m, ctx.J, rng)
    for _ in range(2 * ctx.P):  # coverage-preserving random trades, so sets are not just rotations
        p, q = rng.randrange(ctx.P), rng.randrange(ctx.P)
        only_p = sorted(set(sets[p]) - set(sets[q]))
        only_q = sorted(set(sets[q]) - set(sets[p]))
        if p == q or not only_p:
            continue
        s, t = rng.choice(only_p), rng.choice(only_q)
        new_p = sorted([x for x in sets[p] if x != s] + [t])
        new_q = sorted([x for x in sets[q] if x != t] + [s])
        if _valid(new_p, ctx.S, ctx.m, 0, ctx.J) and _valid(new_q, ctx.S, ctx.m, 0, ctx.J):
            sets[p], sets[q] = new_p, new_q
    locks = _edge_locks(ctx, sets, rng)
    usage = [0] * len(ctx.topo.nodes)
    hops: list[list[int]] = []
    for p in range(ctx.P):
        if not locks[p]:
            sets[p] = _random_swaps(ctx, sets[p], rng)
        route = []
        for s in sets[p]:
            c = rng.choice([r for r in ctx.replicas[s] if usage[r] < ctx.cap])
            usage[c] += 1
            route.append(c)
        hops.append(route)
    return _Plan(list(ctx.origins), list(ctx.mbs), sets, hops, locks)


def _stage_counts(ctx: _Ctx, sets: Sequence[Sequence[int]]) -> list[int]:
    counts = [0] * ctx.S
    for st in sets:
        for s in st:
            counts[s] += 1
    return counts


def _plan_unaware(ctx: _Ctx, rng: random.Random) -> _Plan:
    sets = _balanced_sets(ctx.P, ctx.S, ctx.m, ctx.J, rng)
    locks = _edge_locks(ctx, sets, rng)
    counts = _stage_counts(ctx, sets)
    load_cap = [math.ceil(counts[s] / len(ctx.replicas[s])) for s in range(ctx.S)]
    usage = [0] * len(ctx.topo.nodes)
    hops: list[list[int]] = [[] for _ in range(ctx.P)]
    for p in _priority(ctx):
        route, _ = _route(ctx, ctx.origins[p], sets[p], usage, None, load_cap)
        for c in route:
            usage[c] += 1
        hops[p] = route
    return _Plan(list(ctx.origins), list(ctx.mbs), sets, hops, locks)


def _greedy(ctx: _Ctx, sets: list[list[int]], locks: list[tuple[str, ...]], order: Sequence[int],
            pool_size: int, rng: random.Random) -> _Plan:
    """Insert paths one by one into a reservation table; unlocked paths may pick their set from a pool."""
    usage = [0] * len(ctx.topo.nodes)
    timeline = _Timeline(len(ctx.topo.nodes))
    pool = [sets[p] for p in range(ctx.P) if not locks[p]]
    blocks: list[list[int]] = [[] for _ in range(ctx.P)]
    hops: list[list[int]] = [[] for _ in range(ctx.P)]
    for p in order:
        if locks[p]:
            choice = sets[p]
            route, _ = _route(ctx, ctx.origins[p], choice, usage, timeline)
        else:
            distinct: dict[tuple[int, ...], int] = {}
            for i, st in enumerate(pool):
                distinct.setdefault(tuple(st), i)
            keys = list(distinct)
            if len(keys) > pool_size:
                keys = rng.sample(keys, pool_size)
            best: tuple[float, int, list[int]] | None = None
            for key in keys:
                route_k, obj = _route(ctx, ctx.origins[p], key, usage, timeline)
                if best is None or obj < best[0]:
                    best = (obj, distinct[key], route_k)
            assert best is not None
            _, idx, route = best
            choice = pool.pop(idx)
        for c in route:
            usage[c] += 1
        _reserve_path(ctx, timeline, ctx.origins[p], route)
        blocks[p], hops[p] = list(choice), route
    return _Plan(list(ctx.origins), list(ctx.mbs), blocks, hops, locks)


class _Search:
    """Hill climbing on (makespan, total finish time) with the exact simulator."""

    def __init__(self, ctx: _Ctx, plan: _Plan, rng: random.Random) -> None:
        self.ctx, self.plan, self.rng = ctx, plan, rng
        self.jobs: list[tuple[int, int, float, float]] = []
        self.finish: list[float] = []
        steps = [ctx.cost.steps(o, h) for o, h in zip(plan.origins, plan.hops, strict=True)]
        self.nodes = [s[0] for s in steps]
        self.durs = [s[1] for s in steps]
        self.usage = [0] * len(ctx.topo.nodes)
        for hs in plan.hops:
            for h in hs:
                self.usage[h] += 1
        self.score = self._evaluate()
        self.unlocked = [p for p in range(ctx.P) if not plan.locked[p]]

    def _evaluate(self) -> tuple[float, float]:
        self.jobs = []
        res = simulate_steps(self.nodes, self.durs, self.ctx.cost.link, len(self.ctx.topo.nodes), self.jobs)
        self.finish = res.finish_s
        return res.makespan_s, sum(res.finish_s)

    def _set_path(self, p: int, blocks: list[int], hops: list[int]) -> None:
        self.plan.blocks[p], self.plan.hops[p] = blocks, hops
        self.nodes[p], self.durs[p] = self.ctx.cost.steps(self.plan.origins[p], hops)

    def run(self, evals: int) -> None:
        moves: list[Callable[[], list[tuple[int, list[int], list[int]]] | None]] = [
            self._move_hop, self._move_reinsert]
        weights = [4, 2]
        if len(self.unlocked) >= 2:
            moves += [self._move_trade_stage, self._move_trade_route]
            weights += [3, 1]
        if self.unlocked and self.ctx.max_swaps > 0:
            moves.append(self._move_toggle_swap)
            weights.append(1)
        for _ in range(evals):
            move = self.rng.choices(moves, weights)[0]
            changes = move()
            if not changes:
                continue
            old = [(p, self.plan.blocks[p], self.plan.hops[p]) for p, _, _ in changes]
            jobs, finish = self.jobs, self.finish
            for p, blocks, hops in changes:
                self._apply_usage(self.plan.hops[p], -1)
                self._set_path(p, blocks, hops)
                self._apply_usage(hops, +1)
            score = self._evaluate()
            if score <= self.score:
                self.score = score
            else:
                for p, blocks, hops in old:
                    self._apply_usage(self.plan.hops[p], -1)
                    self._set_path(p, blocks, hops)
                    self._apply_usage(hops, +1)
                self.jobs, self.finish = jobs, finish

    def _move_reinsert(self) -> list[tuple[int, list[int], list[int]]] | None:
        """Re-route one path (half the time the one finishing last) around everyone else's jobs."""
        ctx, rng = self.ctx, self.rng
        if rng.random() < 0.5:
            p = max(range(ctx.P), key=lambda i: self.finish[i])
        else:
            p = rng.randrange(ctx.P)
        timeline = _Timeline(len(ctx.topo.nodes))
        for q, node, start, end in sorted(self.jobs, key=lambda j: j[2]):
            if q != p and end > start:
                timeline.reserve(node, start, end - start)
        self._apply_usage(self.plan.hops[p], -1)
        try:
            hops, _ = _route(ctx, ctx.origins[p], self.plan.blocks[p], self.usage, timeline)
        finally:
            self._apply_usage(self.plan.hops[p], +1)
        if hops == self.plan.hops[p]:
            return None
        return [(p, list(self.plan.blocks[p]), hops)]

    def _apply_usage(self, hops: Sequence[int], sign: int) -> None:
        for h in hops:
            self.usage[h] += sign

    def _move_hop(self) -> list[tuple[int, list[int], list[int]]] | None:
        ctx, rng = self.ctx, self.rng
        p = rng.randrange(ctx.P)
        i = rng.randrange(ctx.m)
        reps = ctx.replicas[self.plan.blocks[p][i]]
        if len(reps) < 2:
            return None
        c = rng.choice(reps)
        if c == self.plan.hops[p][i] or self.usage[c] >= ctx.cap:
            return None
        hops = list(self.plan.hops[p])
        hops[i] = c
        return [(p, list(self.plan.blocks[p]), hops)]

    def _move_trade_stage(self) -> list[tuple[int, list[int], list[int]]] | None:
        ctx, rng = self.ctx, self.rng
        p, q = rng.sample(self.unlocked, 2)
        bp, bq = self.plan.blocks[p], self.plan.blocks[q]
        only_p = [s for s in bp if s not in bq]
        only_q = [s for s in bq if s not in bp]
        if not only_p:
            return None
        s, t = rng.choice(only_p), rng.choice(only_q)
        node_p = dict(zip(bp, self.plan.hops[p], strict=True))
        node_q = dict(zip(bq, self.plan.hops[q], strict=True))
        node_p[t] = node_q.pop(t)
        node_q[s] = node_p.pop(s)
        new_p = sorted(node_p)
        new_q = sorted(node_q)
        if not (_valid(new_p, ctx.S, ctx.m, 0, ctx.J) and _valid(new_q, ctx.S, ctx.m, 0, ctx.J)):
            return None
        return [(p, new_p, [node_p[x] for x in new_p]), (q, new_q, [node_q[x] for x in new_q])]

    def _move_trade_route(self) -> list[tuple[int, list[int], list[int]]] | None:
        p, q = self.rng.sample(self.unlocked, 2)
        return [(p, list(self.plan.blocks[q]), list(self.plan.hops[q])),
                (q, list(self.plan.blocks[p]), list(self.plan.hops[p]))]

    def _move_toggle_swap(self) -> list[tuple[int, list[int], list[int]]] | None:
        ctx, rng = self.ctx, self.rng
        p = rng.choice(self.unlocked)
        if ctx.m < 2:
            return None
        i = rng.randrange(ctx.m - 1)
        blocks, hops = list(self.plan.blocks[p]), list(self.plan.hops[p])
        if abs(blocks[i] - blocks[i + 1]) != 1:
            return None
        blocks[i], blocks[i + 1] = blocks[i + 1], blocks[i]
        hops[i], hops[i + 1] = hops[i + 1], hops[i]
        if not _valid(blocks, ctx.S, ctx.m, ctx.max_swaps, ctx.J):
            return None
        return [(p, blocks, hops)]


def _plan_skippipe(ctx: _Ctx, rng: random.Random) -> _Plan:
    events = ctx.P * (2 * ctx.m + 3)
    work = ctx.P * ctx.m * max(len(r) for r in ctx.replicas[1:])
    small = work <= 4000
    restarts = 6 if small else 1
    pool_size = 8 if small else 1
    evals = ctx.req.search_evals
    if evals is None:  # a count of simulated events, not wall time (a seed gives one plan), sized so
        # that planning stays around a second of one core from small runs up to 1000 nodes
        evals = max(10, min(3000, 150_000 // max(1, events)))
    base_sets = _balanced_sets(ctx.P, ctx.S, ctx.m, ctx.J, rng)
    # Critical path first: origins whose cheapest route is longest enter the table first.
    free_usage = [0] * len(ctx.topo.nodes)
    distinct = sorted({tuple(st) for st in base_sets})[: max(1, pool_size)]
    reach = {o: min(_route(ctx, o, st, free_usage, None)[1] for st in distinct) for o in ctx.origin_nodes}
    critical = sorted(range(ctx.P), key=lambda p: (ctx.mbs[p], -reach[ctx.origins[p]], p))
    best: tuple[tuple[float, float], _Plan] | None = None
    for r in range(restarts):
        sets = [list(s) for s in base_sets]
        if r:
            rng.shuffle(sets)
        locks = _edge_locks(ctx, sets, rng)
        if r % 3 == 0:
            order = list(critical)
        elif r % 3 == 1:
            order = _priority(ctx)
        else:
            order = sorted(range(ctx.P), key=lambda p: (-reach[ctx.origins[p]], ctx.mbs[p], p))
        plan = _greedy(ctx, sets, locks, order, pool_size, rng)
        score = ctx.simulate(plan)
        log.debug("skippipe restart %d: makespan %.3f s", r, score[0])
        if best is None or score < best[0]:
            best = (score, plan)
    assert best is not None
    search = _Search(ctx, best[1].copy(), rng)
    search.run(evals)
    log.debug("skippipe search: %.3f -> %.3f s over %d evaluations", best[0][0], search.score[0], evals)
    return search.plan


PLANNERS: dict[str, Callable[[_Ctx, random.Random], _Plan]] = {
    "full": _plan_full,
    "random": _plan_random,
    "skippipe-unaware": _plan_unaware,
    "skippipe": _plan_skippipe,
}


def plan_paths(request: PlanRequest, planner: str = "skippipe") -> list[PlannedPath]:
    """Plan one path per (origin, microbatch) for one iteration; deterministic for ``request.seed``.

    ``full`` ignores ``request.skip_ratio`` (it visits every stage). The
    result passes ``validate_plan`` (checked before returning) and is sorted by
    origin (topology order) then microbatch. Raises PlanError when the request
    cannot be satisfied.
    """
    if planner not in PLANNERS:
        raise PlanError(f"unknown planner {planner!r}; choose one of {sorted(PLANNERS)}")
    if planner == "full" and request.skip_ratio != 0.0:
        request = dataclasses.replace(request, skip_ratio=0.0)
    ctx = _Ctx(request)
    rng = random.Random(f"{planner}:{request.seed}")
    plan = PLANNERS[planner](ctx, rng)
    paths = ctx.to_paths(plan)
    validate_plan(paths, request)
    if request.swap_edges:
        got = sum(1 for lk in plan.locked if lk)
        if got < ctx.P // 2:
            log.warning("swap_edges: only %d of %d selected microbatches can run their edge swaps under the "
                        "path rules (%d stages, %d per path)", got, ctx.P // 2, ctx.S, ctx.m)
    return paths
