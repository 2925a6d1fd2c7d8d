"""Streaming DiLoCo among the replicas of one stage: fragments, schedule, outer optimizer.

Pure: no networking, no threads. The daemon (or a test, or a benchmark) drives it:

    diloco = StreamingDiLoCo(stage_module, cfg.diloco)
    for step in 1..:                      # `step` = number of committed inner steps
        inner_optimizer.step()
        job = diloco.begin_sync(step)                # the fragment due now, if any
        if job: start averaging job.delta in the background (node.averager.average_job)
        for job in diloco.due_merges(step):          # started `overlap` steps ago (0: this step)
            mean, stats = result of its exchange
            diloco.finish_sync(job, mean, stats.valid)

Conventions (the DiLoCo papers; the sign is the classic bug):
- θ_global is an fp32 copy every replica of the stage agrees on.
- pseudo-gradient Δ = θ_global_old - θ_local (so a descent step of the outer
  SGD, θ_global ← θ_global - lr·Δ, moves θ_global *towards* the local weights).
- outer optimizer: SGD, Nesterov momentum (PyTorch form: b ← μ·b + Δ;
  θ ← θ - lr·(Δ + μ·b)), one momentum buffer per parameter, kept per fragment.
- merge of fragment p, `overlap` (τ) steps after its exchange began:
  θ_local ← alpha·θ_local + (1-alpha)·θ_global_new. With τ > 0 the local weights have
  moved on during the exchange; the merge keeps that progress (alpha) while pulling
  towards the agreed point. alpha = 0, τ = 0, P = 1 is classic DiLoCo.

Fragment rule (``fragment_of_params``): a parameter under ``blocks.{j}.`` belongs to
fragment ``j mod P``; every other parameter (stage 0's embedding, final norm and
head) goes, in sorted name order, to the fragment holding the fewest elements so far
(ties: lowest index). The rule reads only names and shapes, so replicas agree.

Schedule (``fragment_due``): fragment p syncs after committed step t when t > 0 and
(t - offset_p) mod H == 0, offset_p = p·H // P. Offsets are distinct (P ≤ H), so at
most one fragment is due per step and each fragment syncs once every H steps.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowband.node.sync.error_feedback import ErrorFeedback
from lowband.protocols.config import DilocoSection
from lowband.protocols.sparse import SPARSE_CODEC, SparseSelection, params_of, select

logger = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
STATE_VERSION = 1


# ---------------------------------------------------------------------------
# fragments and schedule


def fragment_of_params(named_params: Iterable[tuple[str, torch.Tensor]], fragments: int) -> list[list[str]]:
    """Split parameter names into `fragments` lists (see the module docstring for the rule)."""
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    items = list(named_params)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate parameter names")
    out: list[list[str]] = [[] for _ in range(fragments)]
    sizes = [0] * fragments
    others: list[tuple[str, int]] = []
    for name, tensor in items:
        match = _BLOCK_RE.search(name)
        if match:
            p = int(match.group(1)) % fragments
            out[p].append(name)
            sizes[p] += tensor.numel()
        else:
            others.append((name, tensor.numel()))
    for name, numel in sorted(others):
        p = min(range(fragments), key=lambda k: (sizes[k], k))
        out[p].append(name)
        sizes[p] += numel
    order = {n: i for i, n in enumerate(names)}
    return [sorted(frag, key=order.__getitem__) for frag in out]


def fragment_offsets(cfg: DilocoSection) -> list[int]:
    """Step offset of each fragment within the H-step cycle: p·H // P."""
    return [p * cfg.inner_steps // cfg.fragments for p in range(cfg.fragments)]


def fragment_due(step: int, cfg: DilocoSection) -> int | None:
    """The fragment whose exchange starts after committed inner step `step`, if any."""
    if step <= 0:
        return None
    h = cfg.inner_steps
    for p, offset in enumerate(fragment_offsets(cfg)):
        if (step - offset) % h == 0:
            return p
    return None


def exchange_open(step: int, fragment: int, cfg: DilocoSection) -> bool:
    """Whether a replica at committed step `step` has `fragment`'s exchange under way (snapshotted at
    one of the last `overlap` steps, merged at a later one): its group is in that round now."""
    return any(fragment_due(step - k, cfg) == fragment for k in range(cfg.overlap))


# ---------------------------------------------------------------------------
# outer optimizer


class OuterOptimizer:
    """SGD with Nesterov momentum on θ_global, fp32, one state per fragment.

    ``step`` takes an optional per-parameter boolean mask: elements outside it
    (a shard lost in the exchange) keep their θ_global and momentum unchanged, so
    every replica that lost the same shard stays identical.
    """

    def __init__(self, lr: float, momentum: float = 0.9, *, nesterov: bool = True,
                 lr_final: float = 0.0, ramp_steps: int = 0) -> None:
        if lr <= 0:
            raise ValueError(f"outer lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        if lr_final < 0 or ramp_steps < 0 or (lr_final > 0) != (ramp_steps > 0):
            raise ValueError(f"outer lr ramp needs lr_final > 0 and ramp_steps > 0 together, got "
                             f"{lr_final}, {ramp_steps}")
        self.lr = lr
        self.lr_final = lr_final
        self.ramp_steps = ramp_steps
        self.momentum = momentum
        self.nesterov = nesterov
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}
        self.steps: dict[int, int] = {}

    def lr_at(self, fragment: int) -> float:
        """The lr of ``fragment``'s next outer step. It depends only on the fragment's outer-step count,
        which every replica of a round shares, so replicas stay identical."""
        if self.ramp_steps == 0:
            return self.lr
        done = min(self.steps.get(fragment, 0), self.ramp_steps) / self.ramp_steps
        return self.lr + (self.lr_final - self.lr) * done

    @torch.no_grad()
    def step(
        self,
        fragment: int,
        params: Mapping[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """In place: params[name] (fp32) -= lr * nesterov_update(grads[name])."""
        bufs = self.buffers.setdefault(fragment, {})
        mu = self.momentum
        lr = self.lr_at(fragment)
        for name, grad in grads.items():
            param = params[name]
            g = grad.to(torch.float32)
            buf = bufs.get(name)
            new_buf = g.clone() if buf is None else buf * mu + g
            update = g + mu * new_buf if self.nesterov else new_buf
            new_param = param - lr * update
            mask = None if masks is None else masks.get(name)
            if mask is not None:
                new_buf = torch.where(mask, new_buf, buf if buf is not None else torch.zeros_like(new_buf))
                new_param = torch.where(mask, new_param, param)
            bufs[name] = new_buf
            param.copy_(new_param)
        self.steps[fragment] = self.steps.get(fragment, 0) + 1


# ---------------------------------------------------------------------------
# streaming state machine


@dataclass(slots=True)
class SyncJob:
    """One fragment exchange: the pseudo-gradient snapshot and when to merge its result."""

    fragment: int
    step: int                      # committed inner step that triggered it
    merge_step: int                # step + overlap: when finish_sync is due
    outer_step: int                # this fragment's outer-step index (same on every replica)
    names: list[str]
    shapes: list[torch.Size]
    delta: torch.Tensor            # flat fp32 Δ = θ_global - θ_local at `step`
    finite: bool                   # False: Δ is non-finite, the replica must not contribute it
    stats: dict[str, Any] = field(default_factory=dict)
    sparse: SparseSelection | None = None   # codec "sparse": the entries `delta` holds, for the wire
    local_snapshot: torch.Tensor | None = None   # codec "sparse": flat θ_local at `step` (see finish_sync)

    @property
    def numel(self) -> int:
        return int(self.delta.numel())

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat tensor laid out like `delta` back into per-parameter tensors."""
        if flat.numel() != self.delta.numel():
            raise ValueError(f"flat tensor has {flat.numel()} elements, fragment has {self.delta.numel()}")
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = shape.numel()
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out


class StreamingDiLoCo:
    """θ_global, the outer optimizer and the fragment schedule for one replica of a stage.

    Not thread-safe by design: call every method from the thread that runs the
    inner steps, between steps (begin_sync only reads; finish_sync writes weights).
    The exchange itself (averager or hivemind backend) works on ``job.delta``, a
    detached copy, so it can run in the background.
    """

    def __init__(self, module: nn.Module, cfg: DilocoSection) -> None:
        self.cfg = cfg
        self.module = module
        self.params: dict[str, nn.Parameter] = dict(module.named_parameters())
        self.fragments = fragment_of_params(self.params.items(), cfg.fragments)
        self.global_params: dict[str, torch.Tensor] = {
            n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()
        }
        self.sparse = params_of(cfg) if cfg.codec == SPARSE_CODEC else None
        # SparseLoCo: the error feedback of the sparse sends takes the place of the outer momentum (unless
        # sparse_outer_momentum asks for Nesterov momentum on the averaged sparse update as well)
        self.outer = OuterOptimizer(cfg.outer_lr, cfg.sparse_outer_momentum if self.sparse else cfg.outer_momentum,
                                    lr_final=cfg.outer_lr_final, ramp_steps=cfg.outer_lr_ramp)
        # codec "sparse": per fragment, what the selections left out (flat, fp32); outer state, copied with it
        self.error = ErrorFeedback()
        self.pending: list[SyncJob] = []

    # -- Δ ------------------------------------------------------------------

    @torch.no_grad()
    def pseudo_gradient(self, fragment: int) -> dict[str, torch.Tensor]:
        """Δ = θ_global - θ_local (fp32) for every parameter of `fragment`."""
        return {n: self.global_params[n] - self.params[n].detach().float() for n in self.fragments[fragment]}

    def begin_sync(self, step: int, fragment: int | None = None) -> SyncJob | None:
        """Snapshot Δ of the fragment due after committed step `step` (None if none is due), or of
        `fragment` now, off schedule (a replica that just copied the group's outer state catches up
        with the group's next round instead of waiting for its own next sync point).

        A fragment whose previous exchange is still pending is not snapshotted again: both would
        ask for the same outer step.
        """
        if fragment is None:
            fragment = fragment_due(step, self.cfg)
        if fragment is None or not self.fragments[fragment]:
            return None
        if any(j.fragment == fragment for j in self.pending):
            logger.info("fragment %d at step %d: the previous exchange is still pending; not syncing",
                        fragment, step)
            return None
        delta = self.pseudo_gradient(fragment)
        names = list(delta)
        flat = torch.cat([delta[n].reshape(-1) for n in names]) if names else torch.zeros(0)
        finite = bool(torch.isfinite(flat).all())
        if not finite:
            logger.warning("non-finite pseudo-gradient for fragment %d at step %d: not contributing", fragment,
                           step)
            flat = torch.zeros_like(flat)
        selection = snapshot = None
        if self.sparse is not None and finite:
            snapshot = torch.cat([self.params[n].detach().float().reshape(-1) for n in names])
            # send the top entries of e = β·e + Δ, keep the rest for a later round (given back if lost)
            meant = self.error.compensate(fragment, flat, self.sparse.error_decay)
            selection = select(meant, self.sparse)
            flat = selection.dense()
            self.error.store(fragment, meant, flat)
        job = SyncJob(
            fragment=fragment,
            step=step,
            merge_step=step + self.cfg.overlap,
            outer_step=self.outer.steps.get(fragment, 0),
            names=names,
            shapes=[delta[n].shape for n in names],
            delta=flat,
            finite=finite,
            sparse=selection,
            local_snapshot=snapshot,
        )
        self.pending.append(job)
        return job

    def due_merges(self, step: int) -> list[SyncJob]:
        """Pending jobs whose merge step has come (for the caller to finish, oldest first)."""
        return [j for j in self.pending if j.merge_step <= step]

    @torch.no_grad()
    def finish_sync(
        self,
        job: SyncJob,
        averaged_delta: torch.Tensor | None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Outer step on θ_global with the averaged Δ, then merge into θ_local.

        `averaged_delta` is flat like ``job.delta`` (None: the whole exchange failed,
        nothing changes). `valid` is an optional flat bool mask of the elements
        whose average arrived; others (a lost shard) are left untouched in
        θ_global, the momentum and θ_local. Non-finite averaged elements are
        treated as lost. A replica whose own Δ was non-finite resets the fragment
        to θ_global_new instead of merging (its local weights are broken).

        Codec "sparse": the progress made since the snapshot (the τ overlap steps) is in neither Δ nor
        the error feedback, so the merge keeps it whole: θ_local ← alpha·θ_local + (1-alpha)·(θ_global_new +
        θ_local - θ_local_at_snapshot). Whatever Δ held beyond what was applied is owed in the error
        feedback and arrives by θ_global in a later round; keeping alpha·(that) in θ_local as well would
        count it twice, so sparse runs want alpha = 0.
        """
        if job in self.pending:
            self.pending.remove(job)
        stats: dict[str, Any] = {"fragment": job.fragment, "step": job.step, "applied": 0}
        if averaged_delta is None:
            logger.warning("fragment %d sync from step %d failed: keeping θ_global", job.fragment, job.step)
            if job.sparse is not None:
                self.error.give_back(job.fragment, job.delta)
            return stats
        flat = averaged_delta.detach().to(torch.float32).reshape(-1)
        if flat.numel() != job.numel:
            raise ValueError(f"averaged Δ has {flat.numel()} elements, fragment {job.fragment} has {job.numel}")
        mask = torch.isfinite(flat)
        if valid is not None:
            mask &= valid.reshape(-1).to(torch.bool)
        flat = torch.where(mask, flat, torch.zeros_like(flat))
        full = bool(mask.all())
        if job.sparse is not None and not full:   # a lost shard: what we sent there is still owed
            self.error.give_back(job.fragment, job.delta, ~mask)
        grads = job.unflatten(flat)
        masks = None if full else job.unflatten(mask)
        self.outer.step(job.fragment, self.global_params, grads, masks)
        alpha = self.cfg.alpha if job.finite else 0.0
        since = job.unflatten(job.local_snapshot) if job.local_snapshot is not None and job.finite else None
        for name in job.names:
            local = self.params[name]
            if alpha == 0.0:  # not 0·θ_local: a broken (NaN) local must not leak into the merge
                merged = self.global_params[name].clone()
            else:
                merged = alpha * local.detach().float() + (1.0 - alpha) * self.global_params[name]
            if since is not None:
                merged += (1.0 - alpha) * (local.detach().float() - since[name])
            if masks is not None:
                merged = torch.where(masks[name], merged, local.detach().float())
            local.copy_(merged.to(local.dtype))
        stats["applied"] = int(mask.sum())
        stats["delta_norm"] = float(torch.linalg.vector_norm(flat))
        return stats

    @torch.no_grad()
    def global_digests(self) -> dict[int, str]:
        """A short SHA-256 of each fragment's θ_global (exact bytes): replicas that took part in the same
        rounds hold identical θ_global, so equal outer steps must give equal digests."""
        out: dict[int, str] = {}
        for p, names in enumerate(self.fragments):
            h = hashlib.sha256()
            for name in names:
                h.update(name.encode())
                h.update(self.global_params[name].detach().cpu().contiguous().numpy())
            out[p] = h.hexdigest()[:16]
        return out

    def adopt_outer_step(self, fragment: int, outer_step: int) -> bool:
        """Continue `fragment`'s round numbering from `outer_step` (never backwards): the stage was
        rebuilt and nobody holds its outer state, so θ_global stays this replica's own."""
        if not 0 <= fragment < len(self.fragments):
            raise ValueError(f"fragment {fragment} out of range (0..{len(self.fragments) - 1})")
        if outer_step <= self.outer.steps.get(fragment, 0):
            return False
        self.outer.steps[fragment] = outer_step
        return True

    # -- state for replicas and newcomers --------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """θ_global and the outer state (copies): what a newcomer needs before contributing."""
        return {
            "version": STATE_VERSION,
            "fragments": [list(f) for f in self.fragments],
            "global": {n: t.clone() for n, t in self.global_params.items()},
            "momentum": {p: {n: t.clone() for n, t in bufs.items()} for p, bufs in self.outer.buffers.items()},
            "outer_steps": dict(self.outer.steps),
            "error": {p: self._unflatten(p, residual.clone()) for p in self.error.keys()
                      if (residual := self.error.residual(p)) is not None},
        }

    def _unflatten(self, fragment: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name in self.fragments[fragment]:
            shape = self.global_params[name].shape
            out[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return out

    def fragments_behind(self, state: Mapping[str, Any]) -> list[int]:
        """The fragments whose outer step in another replica's ``state`` is past ours."""
        theirs = {int(p): int(s) for p, s in state.get("outer_steps", {}).items()}
        return [p for p in range(len(self.fragments)) if theirs.get(p, 0) > self.outer.steps.get(p, 0)]

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], *, reset_local: bool = True,
                        fragments: Iterable[int] | None = None) -> None:
        """Adopt another replica's θ_global and outer state (validated; nothing changes on error).

        `reset_local` also sets the local weights to θ_global, which is what a
        newcomer does so its first Δ measures only its own progress. `fragments`
        (default: all) limits the adoption to those fragments: a replica that missed
        one fragment's round copies that one and keeps the others, where it may be
        as far as the source or further.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported DiLoCo state version {state.get('version')!r}")
        if [list(f) for f in state.get("fragments", [])] != self.fragments:
            raise ValueError("DiLoCo state has a different fragment layout (diloco.fragments or model differ)")
        glob = state["global"]
        if set(glob) != set(self.global_params):
            raise ValueError("DiLoCo state has different parameter names")
        owner = {n: p for p, frag in enumerate(self.fragments) for n in frag}
        for name, t in glob.items():
            _check_tensor(t, self.global_params[name].shape, f"global {name}")
        momentum: dict[int, dict[str, torch.Tensor]] = {}
        for p, bufs in state.get("momentum", {}).items():
            p = int(p)
            for name, t in bufs.items():
                if owner.get(name) != p:
                    raise ValueError(f"momentum {name} is not in fragment {p}")
                _check_tensor(t, self.global_params[name].shape, f"momentum {name}")
            momentum[p] = {n: t.detach().to(torch.float32, copy=True) for n, t in bufs.items()}
        errors: dict[int, torch.Tensor] = {}
        for p, bufs in state.get("error", {}).items():
            p = int(p)
            if not 0 <= p < len(self.fragments) or set(bufs) != set(self.fragments[p]):
                raise ValueError(f"error feedback of fragment {p} does not hold exactly that fragment's parameters")
            for name, t in bufs.items():
                _check_tensor(t, self.global_params[name].shape, f"error feedback {name}")
            errors[p] = torch.cat([bufs[n].detach().to(torch.float32).reshape(-1) for n in self.fragments[p]])
        steps = {int(p): int(s) for p, s in state.get("outer_steps", {}).items()}
        if any(p < 0 or p >= len(self.fragments) or s < 0 for p, s in steps.items()):
            raise ValueError("DiLoCo state has out-of-range outer steps")
        chosen = set(range(len(self.fragments)) if fragments is None else fragments)
        if not chosen <= set(range(len(self.fragments))):
            raise ValueError(f"fragments {sorted(chosen)} out of range (0..{len(self.fragments) - 1})")
        names = [n for n in self.global_params if owner[n] in chosen]
        for name in names:
            self.global_params[name].copy_(glob[name])
        for p in chosen:
            if p in momentum:
                self.outer.buffers[p] = momentum[p]
            else:
                self.outer.buffers.pop(p, None)
            if p in steps:
                self.outer.steps[p] = steps[p]
            else:
                self.outer.steps.pop(p, None)
            self.error.set(p, errors.get(p))
        self.pending = [j for j in self.pending if j.fragment not in chosen]
        if reset_local:
            for name in names:
                self.params[name].copy_(self.global_params[name].to(self.params[name].dtype))


def _check_tensor(t: Any, shape: torch.Size, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor")
    if t.shape != shape:
        raise ValueError(f"{what}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: non-finite values")


def state_to_items(state: Mapping[str, Any]) -> list[tuple[str, str, torch.Tensor]]:
    """Flatten a DiLoCo state_dict into (part, name, fp32 tensor) for GetState streaming.

    Parts: "global" (name = parameter), "outer" (name = "{fragment}/{parameter}"
    for momentum, "ef/{fragment}/{parameter}" for the sparse codec's error feedback, "steps" for
    the per-fragment outer steps as a float tensor).
    """
    items: list[tuple[str, str, torch.Tensor]] = [("global", n, t) for n, t in state["global"].items()]
    for p, bufs in sorted(state["momentum"].items()):
        items.extend(("outer", f"{p}/{n}", t) for n, t in bufs.items())
    for p, bufs in sorted(state.get("error", {}).items()):
        items.extend(("outer", f"ef/{p}/{n}", t) for n, t in bufs.items())
    num = len(state["fragments"])
    steps = torch.tensor([float(state["outer_steps"].get(p, 0)) for p in range(num)], dtype=torch.float32)
    items.append(("outer", "steps", steps))
    return items


def state_from_items(items: Iterable[tuple[str, str, torch.Tensor]], fragments: list[list[str]]) -> dict[str, Any]:
    """Inverse of ``state_to_items`` (the layout comes from the receiver's own fragments)."""
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "fragments": [list(f) for f in fragments],
        "global": {},
        "momentum": {},
        "outer_steps": {},
        "error": {},
    }
    for part, name, t in items:
        if part == "global":
            state["global"][name] = t
        elif part == "outer" and name == "steps":
            if t.dim() != 1 or t.numel() != len(fragments):
                raise ValueError(f"outer steps: expected {len(fragments)} values, got shape {tuple(t.shape)}")
            state["outer_steps"] = {p: int(v) for p, v in enumerate(t.tolist()) if v > 0}
        elif part == "outer" and name.startswith("ef/"):
            p_text, _, param = name[3:].partition("/")
            if not p_text.isdigit() or not param:
                raise ValueError(f"error feedback name {name!r}: expected 'ef/<fragment>/<parameter>'")
            state["error"].setdefault(int(p_text), {})[param] = t
        elif part == "outer" and "/" in name:
            p_text, param = name.split("/", 1)
            if not p_text.isdigit():
                raise ValueError(f"outer state name {name!r}: expected '<fragment>/<parameter>'")
            state["momentum"].setdefault(int(p_text), {})[param] = t
        else:
            raise ValueError(f"unknown DiLoCo state item {part!r}/{name!r}")
    return state


def state_to_parts(state: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """``state_to_items`` grouped as {part: {name: tensor}} (the GetState snapshot layout)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for part, name, t in state_to_items(state):
        parts.setdefault(part, {})[name] = t
    return parts


def state_from_parts(parts: Mapping[str, Mapping[str, torch.Tensor]], fragments: list[list[str]]) -> dict[str, Any]:
    """Inverse of ``state_to_parts``; parts other than "global" and "outer" are ignored."""
    items = [(part, name, t) for part in ("global", "outer") for name, t in parts.get(part, {}).items()]
    return state_from_items(items, fragments)
