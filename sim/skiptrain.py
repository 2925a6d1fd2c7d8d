"""In-process SkipPipe training: the staged model trained along per-microbatch paths.

The numerics of a SkipPipe run without the network, to measure what skipping
does to convergence. Each iteration draws exactly the reference trainer's
batch (``lowband.node.train.reference.reference_batches``: same tokens, same order) and cuts
it into ``train.microbatches`` microbatches; microbatch j runs along path j of
the plan (forward and backward, ``lowband.node.train.along_path.path_loss``). Then every stage
takes one AdamW step (``lowband.node.train.optim``, the reference schedule) with the
gradient averaged over the microbatches that actually visited it, clipped per
stage (as ``lowband.node.pipeline.runtime`` does), or over the whole model with
``clip="global"`` (which makes a full-path run equal the reference trainer).

Paths come from the SkipPipe planner (``lowband.coordinator.skippipe.planner.plan_paths``) on a
small uniform topology with one node per stage (one origin holding every
microbatch), with skip ratio ``skippipe.skip_ratio`` and planner
``skippipe.planner``. As in a run with stable membership, one plan is reused
every iteration; ``replan_every`` re-plans with a new seed to mimic membership
changes.

Command line: ``lowband-sim skiptrain --stages 7 --skip-ratio 0.25 --export runs/skip/model.pt``
(or ``python -m sim.skiptrain``), then ``lowband-sim eval --model runs/skip/model.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowband.coordinator.skippipe.paths import PlanRequest, stages_visited
from lowband.coordinator.skippipe.planner import PLANNERS, plan_paths
from lowband.node.train.along_path import Hop, full_path, path_loss, validate_path
from lowband.node.train.data import DataError, load_run_corpus, run_val_batches, split_microbatches
from lowband.node.train.evaluate import mean_loss
from lowband.node.train.export import export_model
from lowband.node.train.model import init_stage, model_config_for
from lowband.node.train.optim import build_inner_optimizer, lr_at, set_lr
from lowband.node.train.reference import reference_batches
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides
from lowband.protocols.vocab import resolve_vocab
from lowband.sim.topology import make_topology

log = logging.getLogger(__name__)

CLIP_MODES = ("stage", "global")


def plan_training_paths(
    num_stages: int, skip_ratio: float, microbatches: int, *, planner: str = "skippipe", seed: int = 0,
    max_swaps: int = 2, max_jump: int = 3,
) -> list[list[int]]:
    """One path (``[0, ..., 0]``) per microbatch of an iteration, planned on a one-node-per-stage topology."""
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; choose one of {', '.join(PLANNERS)}")
    topology = make_topology("uniform", num_stages, num_stages, seed=seed)
    request = PlanRequest(topology=topology, num_stages=num_stages, skip_ratio=skip_ratio,
                          microbatches_per_origin=microbatches, seed=seed, max_swaps=max_swaps,
                          max_jump=max_jump)
    return [list(p.stages) for p in plan_paths(request, planner)]


@dataclass(slots=True)
class SkipTrainResult:
    """What ``train_skip`` returns: the trained stages and a JSON-safe summary."""

    stages: dict[int, nn.Module]
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def _clip(params: list[nn.Parameter], max_norm: float) -> float:
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    limit = max_norm if max_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(with_grad, limit))


def backward_iteration(
    stages: Mapping[int, nn.Module] | Sequence[nn.Module],
    plan: Sequence[Sequence[int]],
    microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    hop: Hop | None = None,
) -> tuple[list[float], Counter[int]]:
    """Forward and backward every microbatch along its path (microbatch j takes ``plan[j % len(plan)]``).

    Leaves in each stage's ``.grad`` the mean of the gradients of the
    microbatches that visited it (what a stage node averages before its inner
    step); returns the microbatch losses and each stage's visit count.
    """
    counts: Counter[int] = Counter()
    losses: list[float] = []
    for j, (x, y) in enumerate(microbatches):
        path = plan[j % len(plan)]
        loss = path_loss(stages, path, x, y, hop)
        loss.backward()   # .grad accumulates the sum over the visiting microbatches
        losses.append(float(loss.detach()))
        counts.update(set(path))
    items = stages.items() if isinstance(stages, Mapping) else enumerate(stages)
    for s, module in items:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.div_(counts[s])
    return losses, counts


def train_skip(
    config: RunConfig,
    *,
    paths: Sequence[Sequence[int]] | None = None,
    clip: str = "stage",
    replan_every: int = 0,
    export: str | Path | None = None,
    eval_every: int | None = None,
    eval_paths: bool = True,
    hop: Hop | None = None,
) -> SkipTrainResult:
    """Train ``config.model.stages`` stages along planned paths; validate on the full path.

    ``paths``: one path per microbatch (cycled if shorter), overriding the
    planner. ``eval_every``: steps between validations (default
    ``train.eval_every``; 0 = only before and after). ``eval_paths``: also
    report the final validation loss along each distinct training path. ``hop``: what crossing the
    network does to activations and their gradients in training (``lowband.node.train.along_path.Hop``);
    validation runs without it, so it measures the model.
    """
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    if replan_every < 0:
        raise ValueError(f"replan_every must be >= 0, got {replan_every}")
    config = resolve_vocab(config)   # a token file's or a BPE's vocabulary when model.vocab_size = 0
    train, S = config.train, config.model.stages
    cfg = model_config_for(config.model)
    stages: dict[int, nn.Module] = {s: init_stage(cfg, s, S, seed=config.seed) for s in range(S)}
    for module in stages.values():
        module.train()
    opts = {s: build_inner_optimizer(m.parameters(), train) for s, m in stages.items()}

    def make_plan(round_index: int) -> list[list[int]]:
        if paths is not None:
            plan = [list(p) for p in paths]
        else:
            plan = plan_training_paths(S, config.skippipe.skip_ratio, train.microbatches,
                                       planner=config.skippipe.planner, seed=config.seed + round_index,
                                       max_swaps=config.skippipe.max_swaps, max_jump=config.skippipe.max_jump)
        if not plan:
            raise ValueError("no training paths")
        for p in plan:
            validate_path(stages, p)
        return plan

    plan = make_plan(0)
    corpus = load_run_corpus(config)
    batches = reference_batches(config, corpus)
    val = run_val_batches(config, corpus)
    every = train.eval_every if eval_every is None else eval_every
    full = full_path(S)
    tokens_per_step = batches.batch_size * batches.seq_len
    log.info("skip training: S=%d k=%s planner=%s plan=%s", S, config.skippipe.skip_ratio,
             config.skippipe.planner, plan)

    history: list[dict[str, Any]] = [{"step": 0, "val_loss": mean_loss(stages, full, val)}]
    visits: Counter[int] = Counter()
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(train.steps):
        if replan_every and step and step % replan_every == 0:
            plan = make_plan(step // replan_every)
        inputs, targets = next(batches)
        losses, counts = backward_iteration(stages, plan, split_microbatches(inputs, targets, train.microbatch_size),
                                            hop)
        visits.update(counts)
        lr = lr_at(step, train)
        if clip == "global":
            _clip([p for m in stages.values() for p in m.parameters()], train.grad_clip)
        for s, module in stages.items():
            if counts[s] == 0:
                continue   # not visited this iteration: no step (its optimizer state waits)
            if clip == "stage":
                _clip(list(module.parameters()), train.grad_clip)
            set_lr(opts[s], lr)
            opts[s].step()
            opts[s].zero_grad(set_to_none=True)
        loss_value = sum(losses) / len(losses)
        record: dict[str, Any] = {"step": step + 1, "loss": loss_value, "lr": lr}
        if every and ((step + 1) % every == 0) and step + 1 < train.steps:
            record["val_loss"] = mean_loss(stages, full, val)
        history.append(record)
    wall = time.perf_counter() - start
    final_val = mean_loss(stages, full, val)
    history.append({"step": train.steps, "val_loss": final_val})

    n_block = S - 1
    block_visits = sum(c for s, c in visits.items() if s != 0)
    summary: dict[str, Any] = {
        "num_stages": S,
        "skip_ratio": config.skippipe.skip_ratio,
        "planner": config.skippipe.planner if paths is None else "given",
        "stages_per_path": stages_visited(S, config.skippipe.skip_ratio) if paths is None else None,
        "paths": plan,
        "clip": clip,
        "steps": train.steps,
        "tokens": train.steps * tokens_per_step,
        "block_compute_fraction": block_visits / max(1, visits[0] * n_block),
        "stage_visits": {str(s): visits[s] for s in sorted(stages)},
        "initial_val_loss": history[0]["val_loss"],
        "final_train_loss": loss_value,
        "final_val_loss": final_val,
        "wall_s": round(wall, 3),
        "seed": config.seed,
    }
    if eval_paths:
        distinct = sorted({tuple(p) for p in plan})
        summary["path_val_loss"] = {",".join(map(str, p)): mean_loss(stages, p, val) for p in distinct}
    if export is not None:
        meta = {k: summary[k] for k in ("num_stages", "skip_ratio", "planner", "steps", "tokens",
                                         "final_val_loss", "seed")}
        meta["source"] = "skiptrain"
        summary["export"] = str(export_model(export, stages, cfg, meta=meta, tokenizer=corpus.tokenizer))
    for module in stages.values():
        module.eval()
    return SkipTrainResult(stages, summary, history)


# ---------------------------------------------------------------------------
# CLI: `lowband-sim skiptrain` (or `python -m sim.skiptrain`)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("skiptrain", help="train the staged model along SkipPipe paths in one process",
                              description=__doc__.splitlines()[0])
    _add_arguments(p)
    p.set_defaults(func=main)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run TOML; flags below override it")
    p.add_argument("--preset", help="model preset (default: tiny)")
    p.add_argument("--stages", type=int, help="S including stage 0 (default: model.stages = 4)")
    p.add_argument("--skip-ratio", type=float, help="skip ratio k (default: skippipe.skip_ratio)")
    p.add_argument("--planner", choices=PLANNERS, help="path planner (default: skippipe when k > 0, else full)")
    p.add_argument("--steps", type=int, help="iterations (default: train.steps)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--data", help="training data (default: the Python standard library's source)")
    p.add_argument("--clip", choices=CLIP_MODES, default="stage", help="gradient clipping per stage or global")
    p.add_argument("--replan-every", type=int, default=0, help="re-plan paths every N iterations (0: never)")
    p.add_argument("--export", help="write the final weights here (lowband-sim eval reads them)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def build_config(args: argparse.Namespace) -> RunConfig:
    config = RunConfig.from_toml(args.config) if args.config else RunConfig()
    flags = {"model.preset": args.preset, "model.stages": args.stages, "skippipe.skip_ratio": args.skip_ratio,
             "train.steps": args.steps, "seed": args.seed, "train.data": args.data}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    config = apply_overrides(config, overrides)
    planner = args.planner or ("skippipe" if config.skippipe.skip_ratio > 0 else "full")
    return apply_overrides(config, [f"skippipe.planner={planner}", *args.set])


def main(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"skiptrain: bad config: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    try:
        result = train_skip(config, clip=args.clip, replan_every=args.replan_every, export=args.export)
    except (DataError, ValueError) as exc:
        print(f"skiptrain: {exc}", file=sys.stderr)
        return 2
    s = result.summary
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"S={s['num_stages']} k={s['skip_ratio']} ({s['planner']}): {s['steps']} steps, {s['tokens']:,} "
              f"tokens in {s['wall_s']:.1f} s; full-path val loss {s['initial_val_loss']:.3f} -> "
              f"{s['final_val_loss']:.3f} (ppl {math.exp(s['final_val_loss']):.2f})")
        if "export" in s:
            print(f"exported: {s['export']}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m sim.skiptrain", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    sys.exit(main(parser.parse_args()))
