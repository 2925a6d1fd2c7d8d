"""Recovery benchmark: CheckFree / CheckFree+ against checkpointing and random re-init.

One process, the tiny model cut into S = 4 pipeline stages (2 blocks each), one
replica per stage, so every failure loses a whole stage. Training runs for real
(node/train/along_path.py ``path_loss``, one AdamW per stage, per-stage gradient
clipping, as each node would do); the wall clock is *emulated* so that failure
rates per hour mean something on a CPU. Costs are in units of ``W``
(``--weights-s``), the time to move one stage's weights over a node's link:

- every iteration costs ``--iter-s`` (pipeline compute and activations);
- every failure costs ``--join-s`` (a replacement starts) plus its transfer,
  while the pipeline waits: CheckFree pulls both neighbours (2W), CheckFree+
  an edge copy pulls one (W), random re-init pulls nothing, and a checkpoint
  restore pulls weights and both AdamW moments (3W);
- ``checkpoint`` also pays 3W per save (every stage uploads weights and
  moments; the pipeline waits), every ``--save-every`` iterations, by default
  the Young/Daly interval ``sqrt(2 * save_s * MTBF)`` for the rate at hand,
  the best fixed interval for that rate; a lost stage is restored from the last
  save: its weights and optimizer state roll back while the other stages keep
  theirs.

Failures: a seeded Poisson process of ``RATE`` whole-stage losses per emulated
hour, each hitting a stage drawn uniformly from 1..S-1 (stage 0, the data
origin, is not failed here: its bookend-copy recovery is a plain copy and is
covered by tests/test_checkfree_math.py). The schedule is drawn in emulated
time, once per rate, and is the SAME for every method; a method that spends
more time (checkpoint saves) meets the failures at earlier iterations, as it
would in a real run.

Methods (recovery planned by coordinator/recovery.py ``plan_recovery``, executed
by node/recovery/checkfree.py ``rebuild_stage``):

- ``checkfree``: intermediate stages rebuilt as the gradient-norm-weighted
  average of their neighbours; edge stages (1, S-1) randomly re-initialised,
  as in the paper, where plain CheckFree cannot recover the edges.
- ``checkfree_plus``: the same, plus out-of-order execution during training
  (every other microbatch runs 1<->2 and S-2<->S-1 swapped, coordinator/skippipe/paths.py
  ``apply_edge_swaps``), and lost edge stages copied from their partner.
- ``checkpoint``: periodic saves and per-stage rollback, as above.
- ``random_reinit``: the lost stage restarts from random weights.

Rebuilt stages (checkfree, checkfree_plus) restart with a fresh AdamW at
``recovery.lr_scale`` (1.1) x the learning rate; random re-init restarts with a
fresh AdamW at 1.0x; checkpoint restores the saved optimizer state.

Target: the validation loss the no-failure run reaches at ``--target-frac`` of
its steps. ``time_to_target_s`` is the emulated time of the first evaluation at
or below it; a run that has not reached it after its planned steps keeps
training (at the schedule's final learning rate, failures still arriving) up to
``extend`` x steps, and reports null if it never does. ``final_val_loss`` is
the validation loss at the planned number of steps. ``--schedules N`` repeats
every rate with N failure schedules (seeds seed..seed+N-1) and averages;
``checkfree_plus_sooner_than`` gives ``1 - t_plus / t_other`` per rate. Run ``python benchmarks/recovery.py --json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `python benchmarks/recovery.py` puts benchmarks/ first on sys.path, where a
# sibling script (benchmarks/coordinator.py) would shadow the coordinator package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowband.coordinator.recovery import plan_recovery  # noqa: E402
from lowband.node.recovery.checkfree import fresh_inner_optimizer, grad_norm, load_rebuilt, rebuild_stage  # noqa: E402
from lowband.node.train.along_path import full_path, path_loss  # noqa: E402
from lowband.node.train.data import BatchIterator, load_corpus, val_batches  # noqa: E402
from lowband.node.train.model import ModelConfig, build_stage  # noqa: E402
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr  # noqa: E402
from lowband.protocols.config import RecoverySection, TrainSection  # noqa: E402

log = logging.getLogger("benchmarks.recovery")

METHODS = ("checkfree", "checkfree_plus", "checkpoint", "random_reinit")
RATES = (5, 10, 16)


@dataclass(kw_only=True)
class Settings:
    stages: int = 4
    steps: int = 200
    microbatches: int = 2
    microbatch_size: int = 4
    seq_len: int = 32
    lr: float = 1e-3              # 4e-3 is unstable at 256 tokens per step, worst with swaps
    warmup_steps: int = 20
    eval_every: int = 10
    eval_batches: int = 4
    eval_batch_size: int = 16
    iter_s: float = 12.0          # emulated seconds per iteration
    weights_s: float = 30.0       # W: one stage's weights over one link
    join_s: float = 30.0          # a replacement node starts and joins
    state_factor: float = 3.0     # weights + two AdamW moments, in units of W
    save_every: int = 0           # checkpoint interval in iterations; 0 = Young/Daly for the rate
    target_frac: float = 0.75
    extend: float = 2.0           # a run short of the target keeps going up to extend x steps
    seed: int = 0
    rates: tuple[int, ...] = RATES
    methods: tuple[str, ...] = METHODS
    recovery: RecoverySection = field(default_factory=RecoverySection)

    @property
    def save_s(self) -> float:
        return self.state_factor * self.weights_s

    def checkpoint_interval(self, rate_per_hour: float) -> int:
        """``--save-every`` if set, else Young/Daly: sqrt(2 * save cost * mean time between failures)."""
        if self.save_every > 0:
            return self.save_every
        if rate_per_hour <= 0:
            return self.steps
        tau_s = math.sqrt(2.0 * self.save_s * 3600.0 / rate_per_hour)
        return max(1, round(tau_s / self.iter_s))


@dataclass
class Failure:
    time_s: float
    stage: int


def failure_schedule(rate_per_hour: float, horizon_s: float, num_stages: int, seed: int) -> list[Failure]:
    """Poisson arrivals of whole-stage losses over ``horizon_s`` emulated seconds, stages 1..S-1."""
    rng = random.Random(f"failures:{seed}:{rate_per_hour}")
    out: list[Failure] = []
    t = 0.0
    while rate_per_hour > 0:
        t += rng.expovariate(rate_per_hour / 3600.0)
        if t > horizon_s:
            break
        out.append(Failure(t, rng.randint(1, num_stages - 1)))
    return out


def swapped_path(num_stages: int, kinds: tuple[str, ...]) -> list[int]:
    """The full pipeline with edge pairs run out of order: front 1<->2, back S-2<->S-1."""
    blocks = list(range(1, num_stages))
    if "front" in kinds:
        blocks[0], blocks[1] = blocks[1], blocks[0]
    if "back" in kinds:
        blocks[-2], blocks[-1] = blocks[-1], blocks[-2]
    return [0, *blocks, 0]


def iteration_paths(num_stages: int, microbatches: int, swap_edges: bool) -> list[list[list[int]]]:
    """Per-iteration microbatch paths, cycled over iterations.

    Without ``swap_edges``: the full pipeline for every microbatch. With it,
    CheckFree+ out-of-order execution as coordinator/skippipe/paths.py
    ``apply_edge_swaps`` plans it (kept local here so the benchmark does not
    follow that planner's API): every other microbatch runs its edge pairs
    swapped; with S = 4 the two pairs share stage 2, so swapped microbatches
    alternate front and back swaps (planned over two iterations so that both
    kinds occur even with two microbatches); S = 3 has one pair only.
    """
    full = full_path(num_stages)
    if not swap_edges or num_stages < 3:
        return [[full] * microbatches]
    if num_stages == 3:
        cycle: list[tuple[str, ...]] = [("front",)]
    elif num_stages == 4:
        cycle = [("front",), ("back",)]
    else:
        cycle = [("front", "back")]
    flat: list[list[int]] = []
    selected = 0
    for i in range(microbatches * len(cycle)):
        if i % 2 == 1:
            flat.append(swapped_path(num_stages, cycle[selected % len(cycle)]))
            selected += 1
        else:
            flat.append(full)
    return [flat[i * microbatches:(i + 1) * microbatches] for i in range(len(cycle))]


class Run:
    """One training run under one method and one failure schedule."""

    def __init__(self, method: str, settings: Settings, schedule: list[Failure], corpus: Any,
                 save_every: int = 0) -> None:
        self.method = method
        self.s = settings
        self.schedule = schedule
        self.save_every = save_every
        self.cfg = ModelConfig.from_preset("tiny")
        self.train = TrainSection(lr=settings.lr, warmup_steps=settings.warmup_steps, steps=settings.steps,
                                  microbatch_size=settings.microbatch_size, microbatches=settings.microbatches)
        S = settings.stages
        self.stages: dict[int, nn.Module] = {s: build_stage(self.cfg, s, S, seed=settings.seed) for s in range(S)}
        self.opts = {s: build_inner_optimizer(m.parameters(), self.train) for s, m in self.stages.items()}
        self.norms: dict[int, float] = {}
        self.batches = BatchIterator(corpus.train, settings.microbatch_size, settings.seq_len, seed=settings.seed)
        self.val = val_batches(corpus, settings.eval_batch_size, settings.seq_len, settings.eval_batches)
        self.paths = iteration_paths(S, settings.microbatches, swap_edges=(method == "checkfree_plus"))
        self.reinit_rng = torch.Generator().manual_seed(settings.seed + 1)
        self.saved: dict[int, tuple[dict, dict]] | None = None
        self.clock = 0.0
        self.overhead_s = {"saves": 0.0, "recoveries": 0.0}
        self.curve: list[tuple[int, float, float]] = []     # (step, emulated s, val loss)
        self.events: list[dict[str, Any]] = []
        if method == "checkpoint":
            self._save()

    # -- failures -----------------------------------------------------------------------------

    def _save(self) -> None:
        self.saved = {s: (copy.deepcopy(m.state_dict()), copy.deepcopy(self.opts[s].state_dict()))
                      for s, m in self.stages.items()}

    def _fresh_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.reinit_rng))

    def _recover(self, stage: int) -> tuple[str, float]:
        """Rebuild ``stage`` by this run's method; returns (what was done, transfer in units of W)."""
        S = self.s.stages
        module = self.stages[stage]
        if self.method == "checkpoint":
            assert self.saved is not None
            weights, opt_state = self.saved[stage]
            load_rebuilt(module, weights)
            self.opts[stage] = build_inner_optimizer(module.parameters(), self.train)
            self.opts[stage].load_state_dict(opt_state)
            return "checkpoint-rollback", self.s.state_factor
        if self.method == "random_reinit":
            fresh = build_stage(self.cfg, stage, S, seed=self._fresh_seed())
            load_rebuilt(module, fresh.state_dict())
            self.opts[stage] = build_inner_optimizer(module.parameters(), self.train)
            return "random-reinit", 0.0
        live = {s: [f"n{s}"] for s in range(S) if s != stage}
        plan = plan_recovery(stage, S, live, candidates=["spare"], grad_norms=self.norms,
                             lr_scale=self.s.recovery.lr_scale, epsilon=self.s.recovery.epsilon,
                             mode="checkfree-plus" if self.method == "checkfree_plus" else "checkfree")
        sources = {s: self.stages[s].state_dict() for s in plan.sources}
        fresh = (build_stage(self.cfg, stage, S, seed=self._fresh_seed()).state_dict()
                 if plan.method == "random-reinit" else None)
        load_rebuilt(module, rebuild_stage(plan.method, sources, plan.weights, fresh_state=fresh))
        self.opts[stage] = fresh_inner_optimizer(module.parameters(), self.train, lr_scale=plan.lr_scale)
        return plan.method, float(len(plan.sources))

    # -- training -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        for m in self.stages.values():
            m.eval()
        path = full_path(self.s.stages)
        losses = [float(path_loss(self.stages, path, x, y)) for x, y in self.val]
        for m in self.stages.values():
            m.train()
        return sum(losses) / len(losses)

    def step(self, step: int) -> None:
        lr = lr_at(step, self.train)
        for opt in self.opts.values():
            set_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
        paths = self.paths[step % len(self.paths)]
        for path in paths:
            x, y = next(self.batches)
            (path_loss(self.stages, path, x, y) / len(paths)).backward()
        for s, m in self.stages.items():
            # Each node clips and steps its own stage; the norm is what it reports for CheckFree.
            self.norms[s] = grad_norm(m)
            if self.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(m.parameters(), self.train.grad_clip)
            self.opts[s].step()

    def run(self, target: float | None = None, max_steps: int | None = None) -> dict[str, Any]:
        """Train ``steps`` iterations; with a ``target``, keep going (up to ``max_steps``) until it is reached.

        The learning-rate schedule is planned for ``steps``; iterations beyond
        it run at the schedule's final (minimum) rate.
        """
        pending = list(self.schedule)
        limit = max(self.s.steps, max_steps or 0)
        reached = False
        for step in range(limit):
            if step >= self.s.steps and (target is None or reached):
                break
            # Failures that struck while the previous iteration (or recovery) ran.
            while pending and pending[0].time_s <= self.clock:
                failure = pending.pop(0)
                how, units = self._recover(failure.stage)
                cost = self.s.join_s + units * self.s.weights_s
                self.clock += cost
                self.overhead_s["recoveries"] += cost
                self.events.append({"step": step, "time_s": round(self.clock, 1), "stage": failure.stage,
                                    "method": how})
            self.step(step)
            self.clock += self.s.iter_s
            if self.method == "checkpoint" and (step + 1) % self.save_every == 0:
                self._save()
                self.clock += self.s.save_s
                self.overhead_s["saves"] += self.s.save_s
            if (step + 1) % self.s.eval_every == 0 or step + 1 == self.s.steps:
                self.curve.append((step + 1, self.clock, self.evaluate()))
                reached = reached or (target is not None and self.curve[-1][2] <= target)
        return {"curve": self.curve, "events": self.events, "overhead_s": self.overhead_s}


def first_at_target(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(step, emulated s) of the first evaluation at or below ``target``."""
    for step, t, loss in curve:
        if loss <= target:
            return step, t
    return None


def target_loss(curve: list[tuple[int, float, float]], steps: int, frac: float) -> float:
    """Validation loss of the no-failure run at ``frac`` of its steps (nearest evaluation)."""
    want = frac * steps
    return min(curve, key=lambda c: abs(c[0] - want))[2]


def summarise(out: dict[str, Any], target: float, steps: int, details: bool) -> dict[str, Any]:
    """One method's row: time and step at target, and the loss and time at the planned ``steps``."""
    hit = first_at_target(out["curve"], target)
    at_steps = next(c for c in out["curve"] if c[0] == steps)
    row: dict[str, Any] = {
        "time_to_target_s": round(hit[1], 1) if hit else None,
        "final_val_loss": round(at_steps[2], 4),
        "step_at_target": hit[0] if hit else None,
        "failures": sum(1 for e in out["events"] if e["step"] < steps),
        "failures_until_target": (sum(1 for e in out["events"] if e["step"] < hit[0]) if hit else None),
        "emulated_s_at_steps": round(at_steps[1], 1),
        "overhead_s_at_end": {k: round(v, 1) for k, v in out["overhead_s"].items()},
    }
    if details:
        row["events"] = out["events"]
        row["curve"] = [(s, round(t, 1), round(v, 4)) for s, t, v in out["curve"]]
    return row


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over failure schedules; time_to_target_s is null unless every schedule reached the target."""
    if len(rows) == 1:
        return rows[0]
    times = [r["time_to_target_s"] for r in rows]
    return {
        "time_to_target_s": round(sum(times) / len(times), 1) if all(t is not None for t in times) else None,
        "final_val_loss": round(sum(r["final_val_loss"] for r in rows) / len(rows), 4),
        "reached": sum(t is not None for t in times),
        "failures": round(sum(r["failures"] for r in rows) / len(rows), 2),
        "per_schedule": rows,
    }


def sooner(by_method: dict[str, Any]) -> dict[str, float | str | None]:
    """How much sooner checkfree_plus reaches the target than each other method: 1 - t_plus / t_other.

    ``"only checkfree_plus reached"`` when the other never did; null when checkfree_plus never did.
    """
    plus = by_method.get("checkfree_plus", {}).get("time_to_target_s")
    out: dict[str, float | str | None] = {}
    for method, row in by_method.items():
        if method == "checkfree_plus":
            continue
        other = row.get("time_to_target_s")
        if plus is None:
            out[method] = None
        elif other is None:
            out[method] = "only checkfree_plus reached"
        else:
            out[method] = round(1.0 - plus / other, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print compact JSON only (no progress log)")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--stages", type=int, default=Settings.stages, choices=(4, 7))
    parser.add_argument("--iter-s", type=float, default=Settings.iter_s)
    parser.add_argument("--weights-s", type=float, default=Settings.weights_s)
    parser.add_argument("--join-s", type=float, default=Settings.join_s)
    parser.add_argument("--save-every", type=int, default=Settings.save_every,
                        help="checkpoint interval in iterations (0: Young/Daly for each rate)")
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--target-frac", type=float, default=Settings.target_frac)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--schedules", type=int, default=3,
                        help="failure schedules per rate (seeds seed..seed+N-1); results are averaged")
    parser.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--details", action="store_true", help="include curves and failure events")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr)
    for noisy in ("lowband.coordinator.recovery", "lowband.node.recovery.checkfree", "lowband.node.train.data"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    settings = Settings(stages=args.stages, steps=args.steps, lr=args.lr, iter_s=args.iter_s, weights_s=args.weights_s,
                        join_s=args.join_s, save_every=args.save_every, target_frac=args.target_frac,
                        seed=args.seed, rates=tuple(args.rates), methods=tuple(args.methods))
    corpus = load_corpus(seed=settings.seed)
    started = time.perf_counter()

    reference = Run("none", settings, [], corpus).run()
    target = target_loss(reference["curve"], settings.steps, settings.target_frac)
    if not math.isfinite(target):
        raise SystemExit("the no-failure run diverged: no target loss")
    # Long enough for the slowest method: failures keep arriving while it catches up.
    max_steps = int(settings.extend * settings.steps)
    horizon = 3 * max_steps * settings.iter_s
    log.info("no-failure run: final val %.4f, target %.4f", reference["curve"][-1][2], target)

    result: dict[str, Any] = {"rates": {}, "checkfree_plus_sooner_than": {}}
    checkpoint_every: dict[str, int] = {}
    for rate in settings.rates:
        save_every = settings.checkpoint_interval(rate)
        checkpoint_every[str(rate)] = save_every
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in settings.methods}
        for k in range(args.schedules):
            # The same schedule for every method at this rate.
            schedule = failure_schedule(rate, horizon, settings.stages, settings.seed + k)
            for method in settings.methods:
                out = Run(method, settings, schedule, corpus, save_every=save_every).run(target, max_steps)
                rows[method].append(summarise(out, target, settings.steps, args.details))
                log.info("rate %s schedule %d %s: %s", rate, k, method,
                         {key: v for key, v in rows[method][-1].items() if key not in ("events", "curve")})
        by_method = {m: aggregate(r) for m, r in rows.items()}
        result["rates"][str(rate)] = by_method
        result["checkfree_plus_sooner_than"][str(rate)] = sooner(by_method)
    result["target_val_loss"] = round(target, 4)
    result["no_failure"] = summarise(reference, target, settings.steps, args.details)
    result["settings"] = {
        "model": "tiny", "stages": settings.stages, "steps": settings.steps,
        "microbatches": settings.microbatches, "microbatch_size": settings.microbatch_size,
        "seq_len": settings.seq_len, "lr": settings.lr, "seed": settings.seed, "schedules": args.schedules,
        "target_frac": settings.target_frac,
        "iter_s": settings.iter_s, "weights_s": settings.weights_s, "join_s": settings.join_s,
        "save_s": settings.save_s, "checkpoint_every": checkpoint_every,
        "lr_scale": settings.recovery.lr_scale, "max_steps": max_steps, "failed_stages": f"1..{settings.stages - 1}",
        "emulated_hours_no_failure": round(settings.steps * settings.iter_s / 3600, 3),
    }
    result["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
