"""Recovery benchmark: CheckFree / CheckFree+ against checkpointing and random re-init.

One process, the tiny model cut into S pipeline stages, one replica per stage,
so every failure loses a whole stage. Training runs for real (node/pipeline.py
``path_loss``, one AdamW per stage, per-stage gradient clipping, as each node
would do); the wall clock is *emulated* so that failure rates per hour mean
something on a CPU:

- every iteration costs ``--iter-s`` emulated seconds (pipeline compute);
- a failure stalls the pipeline for ``--recover-s`` (a replacement starts and
  receives one stage of weights: from a neighbour, from storage, or, for
  random re-init, nothing but the start-up) for every method alike;
- ``checkpoint`` also pays ``--save-s`` every ``--save-every`` iterations
  (stages upload to storage; the pipeline waits), and a lost stage is restored
  from the last save: its weights and optimizer state roll back while the
  other stages keep theirs.

Failures: a seeded Poisson process of ``RATE`` whole-stage losses per emulated
hour, each hitting a stage drawn uniformly from 1..S-1 (stage 0, the data
origin, is not failed here: its bookend-copy recovery is a plain copy and is
covered by tests/test_checkfree_math.py). The schedule is drawn in emulated
time, once per rate, and is the SAME for every method; a method that spends
more time (checkpoint saves) meets the failures at earlier iterations, as it
would in a real run.

Methods (recovery planned by coordinator/recovery.py ``plan_recovery``, executed
by node/checkfree.py ``rebuild_stage``):

- ``checkfree``: intermediate stages rebuilt as the gradient-norm-weighted
  average of their neighbours; edge stages (1, S-1) randomly re-initialised,
  as in the paper, where plain CheckFree cannot recover the edges.
- ``checkfree_plus``: the same, plus out-of-order execution during training
  (every other microbatch runs 1<->2 and S-2<->S-1 swapped, coordinator/paths.py
  ``apply_edge_swaps``), and lost edge stages copied from their partner.
- ``checkpoint``: periodic saves and per-stage rollback, as above.
- ``random_reinit``: the lost stage restarts from random weights.

Rebuilt stages (checkfree, checkfree_plus) restart with a fresh AdamW at
``recovery.lr_scale`` (1.1) x the learning rate; random re-init restarts with a
fresh AdamW at 1.0x; checkpoint restores the saved optimizer state.

Target: the validation loss the no-failure run reaches at ``--target-frac`` of
its steps. ``time_to_target_s`` is the emulated time of the first evaluation at
or below it (null if never). Run ``python benchmarks/recovery.py --json``.
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
from typing import Any

import torch
from torch import nn

from coordinator.paths import PlannedPath, apply_edge_swaps
from coordinator.recovery import plan_recovery
from node.checkfree import fresh_inner_optimizer, grad_norm, load_rebuilt, rebuild_stage
from node.data import BatchIterator, load_corpus, val_batches
from node.model import ModelConfig, build_stage
from node.optim import build_inner_optimizer, lr_at, set_lr
from node.pipeline import full_path, path_loss
from protocols.config import RecoverySection, TrainSection

log = logging.getLogger("benchmarks.recovery")

METHODS = ("checkfree", "checkfree_plus", "checkpoint", "random_reinit")
RATES = (5, 10, 16)


@dataclass(kw_only=True)
class Settings:
    stages: int = 7
    steps: int = 400
    microbatches: int = 2
    microbatch_size: int = 4
    seq_len: int = 32
    lr: float = 4e-3
    warmup_steps: int = 20
    eval_every: int = 10
    eval_batches: int = 4
    eval_batch_size: int = 16
    iter_s: float = 12.0          # emulated seconds per iteration
    recover_s: float = 60.0       # pipeline stall per failure (replacement start + one stage of weights)
    save_every: int = 50          # checkpoint interval, iterations
    save_s: float = 60.0          # emulated seconds per checkpoint save
    target_frac: float = 0.75
    seed: int = 0
    rates: tuple[int, ...] = RATES
    methods: tuple[str, ...] = METHODS
    recovery: RecoverySection = field(default_factory=RecoverySection)


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


def microbatch_paths(num_stages: int, microbatches: int, swap_edges: bool) -> list[list[int]]:
    """The full pipeline for every microbatch; with ``swap_edges``, CheckFree+ swaps on every other one."""
    paths = [PlannedPath("origin", m, full_path(num_stages), ["origin", *map(str, range(1, num_stages)), "origin"])
             for m in range(microbatches)]
    if swap_edges:
        paths = apply_edge_swaps(paths, num_stages)
    return [list(p.stages) for p in paths]


class Run:
    """One training run under one method and one failure schedule."""

    def __init__(self, method: str, settings: Settings, schedule: list[Failure], corpus: Any) -> None:
        self.method = method
        self.s = settings
        self.schedule = schedule
        self.cfg = ModelConfig.from_preset("tiny")
        self.train = TrainSection(lr=settings.lr, warmup_steps=settings.warmup_steps, steps=settings.steps,
                                  microbatch_size=settings.microbatch_size, microbatches=settings.microbatches)
        S = settings.stages
        self.stages: dict[int, nn.Module] = {s: build_stage(self.cfg, s, S, seed=settings.seed) for s in range(S)}
        self.opts = {s: build_inner_optimizer(m.parameters(), self.train) for s, m in self.stages.items()}
        self.norms: dict[int, float] = {}
        self.batches = BatchIterator(corpus.train, settings.microbatch_size, settings.seq_len, seed=settings.seed)
        self.val = val_batches(corpus, settings.eval_batch_size, settings.seq_len, settings.eval_batches)
        self.paths = microbatch_paths(S, settings.microbatches, swap_edges=(method == "checkfree_plus"))
        self.reinit_rng = torch.Generator().manual_seed(settings.seed + 1)
        self.saved: dict[int, tuple[dict, dict]] | None = None
        self.clock = 0.0
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

    def _recover(self, stage: int, step: int) -> str:
        S = self.s.stages
        module = self.stages[stage]
        if self.method == "checkpoint":
            assert self.saved is not None
            weights, opt_state = self.saved[stage]
            load_rebuilt(module, weights)
            self.opts[stage] = build_inner_optimizer(module.parameters(), self.train)
            self.opts[stage].load_state_dict(opt_state)
            return "checkpoint-rollback"
        if self.method == "random_reinit":
            fresh = build_stage(self.cfg, stage, S, seed=self._fresh_seed())
            load_rebuilt(module, fresh.state_dict())
            self.opts[stage] = build_inner_optimizer(module.parameters(), self.train)
            return "random-reinit"
        live = {s: [f"n{s}"] for s in range(S) if s != stage}
        plan = plan_recovery(stage, S, live, candidates=["spare"], grad_norms=self.norms,
                             lr_scale=self.s.recovery.lr_scale, epsilon=self.s.recovery.epsilon,
                             mode="checkfree-plus" if self.method == "checkfree_plus" else "checkfree")
        sources = {s: self.stages[s].state_dict() for s in plan.sources}
        fresh = (build_stage(self.cfg, stage, S, seed=self._fresh_seed()).state_dict()
                 if plan.method == "random-reinit" else None)
        load_rebuilt(module, rebuild_stage(plan.method, sources, plan.weights, fresh_state=fresh))
        self.opts[stage] = fresh_inner_optimizer(module.parameters(), self.train, lr_scale=plan.lr_scale)
        return plan.method

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
        for path in self.paths:
            x, y = next(self.batches)
            (path_loss(self.stages, path, x, y) / len(self.paths)).backward()
        for s, m in self.stages.items():
            # Each node clips and steps its own stage; the norm is what it reports for CheckFree.
            self.norms[s] = grad_norm(m)
            if self.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(m.parameters(), self.train.grad_clip)
            self.opts[s].step()

    def run(self) -> dict[str, Any]:
        pending = list(self.schedule)
        for step in range(self.s.steps):
            while pending and pending[0].time_s <= self.clock:
                failure = pending.pop(0)
                how = self._recover(failure.stage, step)
                self.clock += self.s.recover_s
                self.events.append({"step": step, "time_s": round(self.clock, 1), "stage": failure.stage,
                                    "method": how})
            self.step(step)
            self.clock += self.s.iter_s
            if self.method == "checkpoint" and (step + 1) % self.s.save_every == 0:
                self._save()
                self.clock += self.s.save_s
            if (step + 1) % self.s.eval_every == 0 or step + 1 == self.s.steps:
                self.curve.append((step + 1, self.clock, self.evaluate()))
        return {"curve": self.curve, "events": self.events}


def time_to_target(curve: list[tuple[int, float, float]], target: float) -> float | None:
    for _, t, loss in curve:
        if loss <= target:
            return t
    return None


def target_loss(curve: list[tuple[int, float, float]], steps: int, frac: float) -> float:
    """Validation loss of the no-failure run at ``frac`` of its steps (nearest evaluation)."""
    want = frac * steps
    return min(curve, key=lambda c: abs(c[0] - want))[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result JSON only")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--stages", type=int, default=Settings.stages, choices=(4, 7))
    parser.add_argument("--iter-s", type=float, default=Settings.iter_s)
    parser.add_argument("--recover-s", type=float, default=Settings.recover_s)
    parser.add_argument("--save-every", type=int, default=Settings.save_every)
    parser.add_argument("--save-s", type=float, default=Settings.save_s)
    parser.add_argument("--target-frac", type=float, default=Settings.target_frac)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--details", action="store_true", help="include curves and failure events")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr)
    logging.getLogger("coordinator.recovery").setLevel(logging.ERROR)
    logging.getLogger("node.checkfree").setLevel(logging.ERROR)
    settings = Settings(stages=args.stages, steps=args.steps, iter_s=args.iter_s, recover_s=args.recover_s,
                        save_every=args.save_every, save_s=args.save_s, target_frac=args.target_frac,
                        seed=args.seed, rates=tuple(args.rates), methods=tuple(args.methods))
    corpus = load_corpus(seed=settings.seed)
    started = time.perf_counter()

    reference = Run("none", settings, [], corpus).run()
    target = target_loss(reference["curve"], settings.steps, settings.target_frac)
    horizon = 2 * settings.steps * settings.iter_s   # long enough for the slowest method
    log.info("no-failure run: final val %.4f, target %.4f", reference["curve"][-1][2], target)

    result: dict[str, Any] = {
        "rates": {},
        "target_val_loss": round(target, 4),
        "no_failure": {"time_to_target_s": time_to_target(reference["curve"], target),
                       "final_val_loss": round(reference["curve"][-1][2], 4)},
        "settings": {"stages": settings.stages, "steps": settings.steps, "iter_s": settings.iter_s,
                     "recover_s": settings.recover_s, "save_every": settings.save_every,
                     "save_s": settings.save_s, "target_frac": settings.target_frac,
                     "microbatches": settings.microbatches, "microbatch_size": settings.microbatch_size,
                     "seq_len": settings.seq_len, "seed": settings.seed,
                     "emulated_hours_no_failure": round(settings.steps * settings.iter_s / 3600, 3),
                     "lr_scale": settings.recovery.lr_scale},
    }
    for rate in settings.rates:
        schedule = failure_schedule(rate, horizon, settings.stages, settings.seed)
        by_method: dict[str, Any] = {}
        for method in settings.methods:
            out = Run(method, settings, schedule, corpus).run()
            row: dict[str, Any] = {
                "time_to_target_s": time_to_target(out["curve"], target),
                "final_val_loss": round(out["curve"][-1][2], 4),
                "failures": len(out["events"]),
                "emulated_s": round(out["curve"][-1][1], 1),
            }
            if args.details:
                row["events"] = out["events"]
                row["curve"] = [(s, round(t, 1), round(v, 4)) for s, t, v in out["curve"]]
            by_method[method] = row
            log.info("rate %s %s: %s", rate, method, {k: v for k, v in row.items() if k not in ("events", "curve")})
        result["rates"][str(rate)] = by_method
    result["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
    if not math.isfinite(target):
        log.warning("target loss is not finite")
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
