"""Node-side CheckFree / CheckFree+ rebuild math (pure: tensors in, tensors out).

The coordinator's ``RecoveryPlan`` (coordinator/recovery.py) says which method
rebuilds a lost stage and from which neighbours with which weights; the node
fetches those neighbours' state dicts over ``GetState`` and calls
:func:`rebuild_stage`. No checkpoint file is read or written anywhere here.

- ``checkfree``: ``W_i = (a·W_{i+1} + b·W_{i-1}) / (a + b)`` block by block,
  matched by parameter name (stages hold equal numbers of blocks and name them
  by local index, ``blocks.{j}.…``), with ``a = ‖g_{i+1}‖ + ε`` and
  ``b = ‖g_{i-1}‖ + ε``. Computed in fp32, cast back to the source dtype.
- ``checkfree-plus``: an edge stage copies the neighbour that out-of-order
  training taught to stand in for it (:func:`edge_copy`).
- ``bookend-copy``: stage 0 is restored from the full copy its neighbours keep
  (:func:`bookend_copy_state` / :func:`restore_bookend`).
- ``random-reinit``: the caller's freshly initialised state.

A rebuilt stage then trains with :func:`fresh_inner_optimizer` (a new AdamW at
``lr_scale`` x the learning rate, paper: 1.1) and enters the next outer sync
with the rebuilt weights as its θ_global.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lowband.node.train.optim import build_inner_optimizer
from lowband.protocols import coordinator_pb2
from lowband.protocols.config import TrainSection

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]

# The parts of stage 0 (node/train/model.py Bookend) that stages 1 and S-1 keep a copy of.
BOOKEND_KEYS = ("embed.weight", "norm.weight", "output.weight")
# ... and, in a subspace model, the fixed token anchors of its embedding (the hop codec's shared state)
BOOKEND_BUFFERS = ("embed.anchors",)


class CheckFreeError(ValueError):
    """The states or weights given to a rebuild do not fit together."""


def _check_matching(states: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """Same parameter names and shapes in every state; returns the names in order."""
    items = list(states.items())
    if not items:
        raise CheckFreeError("no source states to rebuild from")
    ref_label, ref = items[0]
    names = list(ref)
    for label, state in items[1:]:
        missing = sorted(set(ref) - set(state))
        extra = sorted(set(state) - set(ref))
        if missing or extra:
            raise CheckFreeError(
                f"parameter names differ between {ref_label} and {label}: "
                f"missing in {label}: {missing[:5]}, only in {label}: {extra[:5]}"
            )
        for name in names:
            if tuple(state[name].shape) != tuple(ref[name].shape):
                raise CheckFreeError(
                    f"{name}: shape {tuple(state[name].shape)} in {label} does not match "
                    f"{tuple(ref[name].shape)} in {ref_label}"
                )
    for label, state in items:
        for name in names:
            t = state[name]
            if not isinstance(t, torch.Tensor):
                raise CheckFreeError(f"{name} in {label} is not a tensor")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckFreeError(f"{name} in {label} holds non-finite values")
    return names


def weighted_average(states: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]) -> State:
    """``sum_k w_k·state_k / sum_k w_k`` per parameter, in fp32, cast back to each tensor's dtype.

    ``states`` and ``weights`` share their keys (labels such as stage ids);
    weights must be finite, non-negative and not all zero.
    """
    if set(states) != set(weights):
        raise CheckFreeError(f"weights {sorted(map(str, weights))} do not name the sources {sorted(map(str, states))}")
    for label, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise CheckFreeError(f"weight of {label} must be a finite number >= 0, got {w!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise CheckFreeError("weights sum to zero")
    names = _check_matching(states)
    out: State = {}
    for name in names:
        first = next(iter(states.values()))[name]
        if not first.is_floating_point():
            # Integer buffers (counters) are not averaged: take the heaviest source's.
            heaviest = max(weights, key=lambda k: weights[k])
            out[name] = states[heaviest][name].detach().clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for label, state in states.items():
            acc.add_(state[name].detach().to(device="cpu", dtype=torch.float32), alpha=float(weights[label]) / total)
        out[name] = acc.to(first.dtype)
    return out


def checkfree_average(prev_state: Mapping[str, torch.Tensor], next_state: Mapping[str, torch.Tensor],
                      a: float, b: float, eps: float = 1e-8) -> State:
    """CheckFree: ``((a+ε)·W_next + (b+ε)·W_prev) / (a + b + 2ε)``, block by block.

    ``a`` is the NEXT stage's (i+1) last gradient norm and weights ``next_state``;
    ``b`` is the PREVIOUS stage's (i-1) and weights ``prev_state``. ε goes on
    both norms so that two zero norms give the plain mean instead of 0/0.
    """
    for label, x in (("a", a), ("b", b), ("eps", eps)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0):
            raise CheckFreeError(f"{label} must be a finite number >= 0, got {x!r}")
    return weighted_average({"next": next_state, "prev": prev_state}, {"next": a + eps, "prev": b + eps})


def edge_copy(neighbour_state: Mapping[str, torch.Tensor]) -> State:
    """CheckFree+: a lost edge stage takes a copy of its out-of-order-trained neighbour."""
    _check_matching({"neighbour": neighbour_state})
    return {name: t.detach().clone() for name, t in neighbour_state.items()}


def bookend_copy_state(stage0_state: Mapping[str, torch.Tensor]) -> State:
    """The copy of stage 0 (embedding, final norm, head) that stages 1 and S-1 keep.

    Refreshed at every outer sync (``StateRequest`` part ``bookend``); small, so
    a full copy is kept rather than a split between the two holders.
    """
    missing = [k for k in BOOKEND_KEYS if k not in stage0_state]
    if missing:
        raise CheckFreeError(f"not a stage-0 state: missing {missing}")
    keys = [*BOOKEND_KEYS, *(k for k in BOOKEND_BUFFERS if k in stage0_state)]
    _check_matching({"stage 0": {k: stage0_state[k] for k in keys}})
    return {k: stage0_state[k].detach().clone() for k in keys}


def restore_bookend(copy: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None) -> State:
    """Stage 0's state from a neighbour's bookend copy; checked against ``reference`` shapes if given."""
    state = bookend_copy_state(copy)
    if reference is not None:
        _check_matching({"bookend copy": state, "stage 0": {k: reference[k] for k in BOOKEND_KEYS if k in reference}})
    return state


REBUILD_METHODS = ("replica-copy", "checkfree", "checkfree-plus", "bookend-copy", "random-reinit")
# "fresh": the coordinator's start-of-run plan (initial weights from the run seed, no sources).
PLAN_METHODS = ("fresh", *REBUILD_METHODS)


def read_plan(msg: coordinator_pb2.RecoveryPlan, num_stages: int) -> tuple[dict[int, list[tuple[str, str]]],
                                                                          dict[int, float]]:
    """Validate a coordinator's RecoveryPlan and group it: source stage -> [(node_id, address)], weights.

    Every node of a source stage must carry the same weight (any one of them
    serves that stage's state); a bad plan raises CheckFreeError and nothing is
    fetched.
    """
    if msg.method not in PLAN_METHODS:
        raise CheckFreeError(f"recovery plan {msg.plan_id}: unknown method {msg.method!r}")
    if not 0 <= msg.stage < num_stages:
        raise CheckFreeError(f"recovery plan {msg.plan_id}: stage {msg.stage} outside 0..{num_stages - 1}")
    if not (math.isfinite(msg.lr_scale) and msg.lr_scale > 0):
        raise CheckFreeError(f"recovery plan {msg.plan_id}: lr_scale must be finite and > 0, got {msg.lr_scale}")
    if len(msg.weights) != len(msg.sources):
        raise CheckFreeError(f"recovery plan {msg.plan_id}: {len(msg.sources)} sources but "
                             f"{len(msg.weights)} weights")
    sources: dict[int, list[tuple[str, str]]] = {}
    weights: dict[int, float] = {}
    for peer, w in zip(msg.sources, msg.weights, strict=True):
        if not 0 <= peer.stage < num_stages:
            raise CheckFreeError(f"recovery plan {msg.plan_id}: source stage {peer.stage} out of range")
        if not (math.isfinite(w) and w >= 0):
            raise CheckFreeError(f"recovery plan {msg.plan_id}: weight {w} of {peer.node_id!r} is not finite >= 0")
        if peer.stage in weights and not math.isclose(weights[peer.stage], w, rel_tol=1e-9, abs_tol=1e-12):
            raise CheckFreeError(f"recovery plan {msg.plan_id}: stage {peer.stage} has two weights")
        weights[peer.stage] = w
        sources.setdefault(peer.stage, []).append((peer.node_id, peer.address))
    if msg.method not in ("fresh", "random-reinit") and not sources:
        raise CheckFreeError(f"recovery plan {msg.plan_id}: method {msg.method} needs sources")
    return sources, weights


def rebuild_stage(method: str, sources_states: Mapping[int, Mapping[str, torch.Tensor]],
                  weights: Mapping[int, float], *, fresh_state: Mapping[str, torch.Tensor] | None = None) -> State:
    """Execute a plan's method on the fetched source states.

    ``sources_states``: source stage -> that stage's state dict (part ``local``,
    or ``bookend`` for ``bookend-copy``); ``weights``: the plan's weights.
    ``fresh_state``: a freshly initialised state, needed for ``random-reinit``
    (a caller that already holds a freshly built module can simply keep it).
    """
    if method == "checkfree":
        if not sources_states:
            raise CheckFreeError("checkfree needs at least one neighbour state")
        if set(sources_states) != set(weights):
            raise CheckFreeError(f"checkfree: states for stages {sorted(sources_states)} "
                                 f"but weights for {sorted(weights)}")
        if len(sources_states) == 1:
            return edge_copy(next(iter(sources_states.values())))
        return weighted_average(dict(sources_states), dict(weights))
    if method in ("checkfree-plus", "bookend-copy", "replica-copy"):
        if len(sources_states) != 1:
            raise CheckFreeError(f"{method} copies exactly one source, got stages {sorted(sources_states)}")
        (state,) = sources_states.values()
        return bookend_copy_state(state) if method == "bookend-copy" else edge_copy(state)
    if method == "random-reinit":
        if fresh_state is None:
            raise CheckFreeError("random-reinit needs fresh_state (a newly initialised stage)")
        log.warning("rebuilding stage by random re-initialisation")
        return edge_copy(fresh_state)
    raise CheckFreeError(f"unknown recovery method {method!r}")


@torch.no_grad()
def load_rebuilt(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a rebuilt state into a stage module, refusing any name or shape mismatch."""
    own = module.state_dict()
    _check_matching({"stage module": own, "rebuilt state": state})
    module.load_state_dict(dict(state), strict=True)


def fresh_inner_optimizer(params: Iterable[nn.Parameter], train_cfg: TrainSection,
                          lr_scale: float = 1.1) -> torch.optim.Optimizer:
    """A new inner optimizer for a rebuilt stage at ``lr_scale`` x the run's learning rate.

    The old moments belonged to weights that no longer exist; the slightly
    higher rate (paper: 1.1, ``recovery.lr_scale``) helps the rebuilt stage
    catch up with its neighbours.
    """
    if not (math.isfinite(lr_scale) and lr_scale > 0):
        raise CheckFreeError(f"lr_scale must be a finite number > 0, got {lr_scale}")
    return build_inner_optimizer(params, train_cfg, lr_scale=lr_scale)


def grad_norm(module: nn.Module) -> float:
    """L2 norm of a stage's current gradients: what a node reports for CheckFree weighting."""
    sq = 0.0
    for p in module.parameters():
        if p.grad is not None:
            sq += float(p.grad.detach().float().pow(2).sum())
    return math.sqrt(sq)
