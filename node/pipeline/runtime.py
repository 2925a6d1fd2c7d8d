"""The stage runtime: forward/backward of single microbatches and the inner step.

No networking here. A ``StageRuntime`` owns one stage module and its inner
optimizer. Every torch call runs on one worker thread (a single-thread
executor), so the autograd state of the stage is only ever touched by one
thread and the event loop stays free for gRPC. Bookkeeping (which microbatch
of which iteration is open, done or abandoned) lives on the event loop.

Iteration rule: the stage takes its inner step once every
microbatch scheduled through it in the iteration has finished backward or been
abandoned, never mid-microbatch. Its gradient for a parameter is the mean over
the microbatches that actually contributed a gradient to it. Every wait is
bounded: an iteration that makes no progress for ``iteration_timeout_s`` is
closed with what it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from lowband.node.pipeline.device_hop import DeviceHop
from lowband.node.train.precision import autocast_context, autocast_dtype

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StageError(Exception):
    """A microbatch cannot be processed here (stale iteration, unknown microbatch, bad shape)."""

    def __init__(self, message: str, open_iteration: int = 0) -> None:
        super().__init__(message)
        self.open_iteration = open_iteration   # set when refused as stale: where this stage is


@dataclass(frozen=True, slots=True)
class MicrobatchKey:
    """Identifies one microbatch of one origin's iteration across the whole run."""

    origin_id: str
    iteration: int
    microbatch: int


@dataclass(slots=True)
class _Saved:
    """What backward needs: the input leaf (None for the embedding) and the output with its graph."""

    inputs: torch.Tensor | None
    outputs: torch.Tensor


@dataclass(slots=True)
class StepResult:
    """One inner step, for metrics and event logs."""

    iteration: int
    microbatches: int          # microbatches whose backward finished here
    abandoned: int
    grad_norm: float
    lr: float
    forced: bool               # closed by timeout rather than by completion
    applied: bool              # False when there was no (finite) gradient


@dataclass(slots=True)
class _Iteration:
    started: set[MicrobatchKey] = field(default_factory=set)
    done: set[MicrobatchKey] = field(default_factory=set)
    abandoned: set[MicrobatchKey] = field(default_factory=set)
    epochs: dict[str, int] = field(default_factory=dict)   # origin -> plan epoch its microbatches came under

    def closed(self) -> int:
        return len(self.done | self.abandoned)


class StageRuntime:
    """One stage's module, inner optimizer and microbatch bookkeeping.

    ``expected`` is how many microbatches pass through this stage per
    iteration (the sum of the schedule's visits; an origin's own path count).
    ``lr_fn(iteration)`` sets the learning rate before each step.
    ``slowdown`` > 1 emulates a slower device by sleeping (slowdown-1) x compute time.
    """

    def __init__(
        self,
        module: nn.Module,
        stage: int,
        optimizer: torch.optim.Optimizer | None,
        *,
        grad_clip: float = 0.0,
        lr_fn: Callable[[int], float] | None = None,
        expected: int = 1,
        iteration: int = 0,
        iteration_timeout_s: float = 30.0,
        slowdown: float = 1.0,
        on_step: Callable[[StepResult], None] | None = None,
        device: torch.device | str = "cpu",
        after_step: Callable[[int], None] | None = None,
        precision: str = "auto",
    ) -> None:
        if slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1, got {slowdown}")
        autocast_dtype(torch.device(device), precision)   # a precision the device cannot run is refused here
        self.module = module
        self.stage = stage
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.lr_fn = lr_fn
        self.expected = max(1, expected)
        self.iteration = iteration
        self.iteration_timeout_s = iteration_timeout_s
        self.slowdown = slowdown
        self.on_step = on_step
        self.device = torch.device(device)
        # forward and loss run under train.precision's autocast (bf16 on CUDA by default); parameters, their
        # gradient sums and the optimizer stay fp32 (the master weights DiLoCo averages)
        self.precision = precision
        self.hop = DeviceHop(self.device)   # pinned, non-blocking copies to and from a CUDA device
        self.after_step = after_step   # worker thread, between inner steps (outer sync hooks in here)
        # How many microbatches an iteration expects, from the plan epochs its origins launched it under
        # (None: ``expected``). A plan changes mid-iteration when membership does; the microbatches already
        # launched follow the old plan, so counting them by the new one would wait for some that never come.
        # Called with origin -> epoch, origin -> microbatches closed (done or abandoned) and seen here, and
        # the origins that have moved on (finished the open iteration: see ``origin_finished``).
        self.expected_fn: Callable[[Mapping[str, int], Mapping[str, int], Mapping[str, int], AbstractSet[str]],
                                   int] | None = None
        # origin -> the latest iteration it is known to have finished (see ``origin_finished``)
        self._finished_through: dict[str, int] = {}
        self.adopt_next_iteration = False   # a late joiner takes the iteration of its first microbatch
        self.last_grad_norm = 0.0
        self.steps_applied = 0
        self.compute_s = 0.0
        self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self._params = [p for p in module.parameters() if p.requires_grad]
        self.compute_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        self._grad_sum: list[torch.Tensor | None] = [None] * len(self._params)
        self._grad_count = [0] * len(self._params)
        self._touched: dict[MicrobatchKey, set[int]] = {}   # worker thread only
        self._saved: dict[MicrobatchKey, _Saved] = {}       # worker thread only
        self._iters: dict[int, _Iteration] = {}
        # the CUDA current device is per thread: the worker's is the stage's (cuda:N), for every op that
        # does not name a device
        initializer = (lambda: torch.cuda.set_device(self.device)) if self.device.type == "cuda" else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{stage}",
                                            initializer=initializer)
        self._cond: asyncio.Condition | None = None
        self._close_lock: asyncio.Lock | None = None
        self._last_progress = time.monotonic()
        self._closed_executor = False

    # ------------------------------------------------------------------ plumbing

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    @property
    def close_lock(self) -> asyncio.Lock:
        if self._close_lock is None:
            self._close_lock = asyncio.Lock()
        return self._close_lock

    async def run(self, fn: Callable[..., T], *args: Any, slow: bool = True) -> T:
        """Run ``fn`` on the stage's worker thread (the only thread that touches its autograd state)."""
        loop = asyncio.get_running_loop()

        def timed() -> T:
            start = time.perf_counter()
            result = fn(*args)
            elapsed = time.perf_counter() - start
            self.compute_s += elapsed
            if slow and self.slowdown > 1.0:
                time.sleep((self.slowdown - 1.0) * elapsed)
            return result

        return await loop.run_in_executor(self._executor, timed)

    def shutdown(self) -> None:
        if not self._closed_executor:
            self._closed_executor = True
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _iter(self, iteration: int) -> _Iteration:
        it = self._iters.get(iteration)
        if it is None:
            it = self._iters[iteration] = _Iteration()
        return it

    def _progress(self) -> None:
        self._last_progress = time.monotonic()

    def _expected_of(self, it: _Iteration) -> int:
        if self.expected_fn is None:
            return self.expected
        closed_keys = it.done | it.abandoned
        closed = Counter(k.origin_id for k in closed_keys)
        seen = Counter(k.origin_id for k in it.started | closed_keys)
        moved_on = {origin for origin, last in self._finished_through.items() if last >= self.iteration}
        return max(1, self.expected_fn(it.epochs, closed, seen, moved_on))

    def pending(self) -> int:
        """Microbatches of the open iteration not yet done or abandoned (for status and tests)."""
        it = self._iter(self.iteration)
        return self._expected_of(it) - it.closed()

    def jump_to(self, iteration: int) -> None:
        """Skip ahead to ``iteration`` (only when the open iteration has no activity: nothing is lost)."""
        if iteration <= self.iteration:
            return
        if self.open_activity():
            raise StageError(f"cannot skip iteration {self.iteration}: it has microbatches in flight")
        logger.info("stage %d skips from iteration %d to %d", self.stage, self.iteration, iteration)
        for it in [i for i in self._iters if i < iteration]:
            del self._iters[it]
        self.iteration = iteration
        self._progress()

    def _patience(self) -> float:
        """How long a microbatch of a later iteration waits for the open one to close without progress.

        With work of the open iteration still under way here, the iteration timeout. With none (all it
        lacks is microbatches that have not arrived, while an origin has already moved on), a third of it:
        the missing ones were most likely launched under a plan that does not route them here (a node
        that just joined or moved, or an origin that re-planned), and if one still comes it is refused and
        its origin catches up, which costs one microbatch instead of a stalled pipeline."""
        it = self._iters.get(self.iteration)
        busy = it is not None and bool(it.started - it.done - it.abandoned)
        return self.iteration_timeout_s if busy else self.iteration_timeout_s / 3

    def holds(self, key: MicrobatchKey) -> bool:
        """Whether activations are kept for ``key`` (dict membership is atomic, so safe from the loop)."""
        return key in self._saved

    def in_flight(self) -> list[MicrobatchKey]:
        """Microbatches started here, in open or later iterations, and neither done nor abandoned."""
        return [k for it in list(self._iters.values()) for k in it.started - it.done - it.abandoned]

    def open_activity(self) -> bool:
        it = self._iters.get(self.iteration)
        return it is not None and bool(it.started or it.done or it.abandoned)

    # ------------------------------------------------------------------ admission

    async def admit(self, key: MicrobatchKey, epoch: int = 0) -> None:
        """Let a microbatch start here: wait (bounded) until its iteration is the open one. ``epoch``: the
        plan epoch its origin launched it under (0: unknown)."""
        if self.adopt_next_iteration:
            self.adopt_next_iteration = False
            if key.iteration > self.iteration:
                logger.info("stage %d adopts iteration %d (was %d)", self.stage, key.iteration, self.iteration)
                self._iters = {i: v for i, v in self._iters.items() if i >= key.iteration}
                self.iteration = key.iteration
        if key.iteration < self.iteration:
            raise StageError(f"microbatch {key} is for iteration {key.iteration}, already closed "
                             f"(open iteration {self.iteration})", open_iteration=self.iteration)
        if key in self._iter(key.iteration).abandoned:
            raise StageError(f"microbatch {key} was abandoned")
        if key.iteration > self.iteration:
            # an origin launches an iteration only once every microbatch of the one before is done or
            # abandoned (or it skipped it, catching up): it has finished the ones before this
            await self.origin_finished(key.origin_id, key.iteration - 1)
        if key.iteration > self.iteration and not self.open_activity():
            # Nothing has happened in the open iteration (paths repeat every iteration, so an origin
            # that is already further did not skip us): skipping it loses no gradient.
            self.jump_to(key.iteration)
        async with self.cond:
            while key.iteration > self.iteration:
                remaining = self._last_progress + self._patience() - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self.cond.wait(), timeout=remaining)
                except TimeoutError:
                    pass
        # No progress for too long: close the waiting iterations with what they have.
        while key.iteration > self.iteration:
            await self.close_iteration(forced=True)
        if key.iteration < self.iteration:
            raise StageError(f"microbatch {key} arrived after its iteration closed",
                             open_iteration=self.iteration)
        it = self._iter(key.iteration)
        it.started.add(key)
        if epoch:
            it.epochs.setdefault(key.origin_id, epoch)
        self._progress()

    # ------------------------------------------------------------------ compute (worker thread)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast_context(self.device, self.precision)

    def _accumulate(self, key: MicrobatchKey, grads: tuple[torch.Tensor | None, ...]) -> None:
        touched = self._touched.setdefault(key, set())
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self._grad_sum[i] is None:
                self._grad_sum[i] = g.detach().clone()
            else:
                self._grad_sum[i].add_(g)
            if i not in touched:   # count each microbatch once per parameter, however often it passes
                touched.add(i)
                self._grad_count[i] += 1

    def _forward_sync(self, key: MicrobatchKey | None, h_in: torch.Tensor) -> torch.Tensor:
        h_in = self.hop.to_device(h_in, self.compute_dtype)   # activations may arrive in their wire dtype (bf16)
        if key is None:   # evaluation: nothing kept
            with torch.no_grad(), self._autocast():
                return self.module(h_in)
        x = h_in.detach().requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            y = self.module(x)
        self._saved[key] = _Saved(x, y)
        return y.detach()

    def _embed_sync(self, key: MicrobatchKey | None, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.hop.to_device(tokens)
        if key is None:
            with torch.no_grad(), self._autocast():
                return self.module.embed_tokens(tokens)
        with torch.enable_grad(), self._autocast():
            h = self.module.embed_tokens(tokens)
        self._saved[key] = _Saved(None, h)
        return h.detach()

    def _backward_sync(self, key: MicrobatchKey, grad_out: torch.Tensor) -> torch.Tensor | None:
        saved = self._saved.pop(key, None)
        if saved is None:
            raise StageError(f"no saved activations for microbatch {key} (abandoned or never seen)")
        if grad_out.shape != saved.outputs.shape:
            raise StageError(f"gradient shape {tuple(grad_out.shape)} does not match the output "
                             f"{tuple(saved.outputs.shape)} of microbatch {key}")
        inputs = [saved.inputs] if saved.inputs is not None else []
        grads = torch.autograd.grad(
            saved.outputs, inputs + self._params, self.hop.to_device(grad_out, saved.outputs.dtype),
            allow_unused=True,
        )
        self._accumulate(key, grads[len(inputs):])
        return grads[0] if inputs else None

    def _head_sync(self, key: MicrobatchKey | None, h: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[float, torch.Tensor | None]:
        h, targets = self.hop.to_device(h, self.compute_dtype), self.hop.to_device(targets)
        if key is None:
            with torch.no_grad(), self._autocast():
                return float(self.module.loss(h, targets)), None
        x = h.detach().requires_grad_(True)
        with torch.enable_grad(), self._autocast():
            loss = self.module.loss(x, targets)
        grads = torch.autograd.grad(loss, [x, *self._params], allow_unused=True)
        self._accumulate(key, grads[1:])
        return float(loss.detach()), grads[0]

    def _drop_sync(self, keys: list[MicrobatchKey]) -> None:
        for key in keys:
            self._saved.pop(key, None)

    def _step_sync(self, iteration: int, done: int, abandoned: int, forced: bool) -> StepResult:
        have = [i for i, c in enumerate(self._grad_count) if c > 0 and self._grad_sum[i] is not None]
        lr = self.lr_fn(iteration) if self.lr_fn is not None else float("nan")
        grad_norm = 0.0
        applied = False
        if have and self.optimizer is not None:
            for i, p in enumerate(self._params):
                g = self._grad_sum[i]
                p.grad = g.div_(self._grad_count[i]) if (g is not None and self._grad_count[i] > 0) else None
            with_grad = [self._params[i] for i in have]
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
            if math.isfinite(grad_norm):
                if self.lr_fn is not None:
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                self.optimizer.step()
                applied = True
            else:
                logger.warning("stage %d iteration %d: non-finite gradient norm, step skipped",
                               self.stage, iteration)
            for p in self._params:
                p.grad = None
        self._grad_sum = [None] * len(self._params)
        self._grad_count = [0] * len(self._params)
        self._touched.clear()
        for key in [k for k in self._saved if k.iteration <= iteration]:
            del self._saved[key]
        if applied:
            self.steps_applied += 1
            self.last_grad_norm = grad_norm
        if self.after_step is not None:
            try:
                self.after_step(iteration + 1)
            except Exception:   # the outer sync must never stop inner training
                logger.exception("stage %d: after-step hook failed at step %d", self.stage, iteration + 1)
        return StepResult(iteration, done, abandoned, grad_norm, lr, forced, applied)

    # ------------------------------------------------------------------ async API (event loop)

    async def forward(self, key: MicrobatchKey | None, h_in: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Block-stage forward; keeps the graph for backward. ``key=None``: evaluation, nothing kept."""
        if key is not None:
            await self.admit(key, epoch)
        return await self.run(self._forward_sync, key, h_in)

    async def embed(self, key: MicrobatchKey | None, tokens: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Origin: embed a microbatch's tokens (hop 0)."""
        if key is not None:
            await self.admit(key, epoch)
        return await self.run(self._embed_sync, key, tokens)

    async def head(self, key: MicrobatchKey | None, h: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[float, torch.Tensor | None]:
        """Origin: head + loss of a returning microbatch and its backward through the head.

        Returns the loss and the gradient for the last block stage (None when evaluating).
        """
        if key is not None:
            self._check_open(key)
        result = await self.run(self._head_sync, key, h, targets)
        if key is not None:
            self._progress()
        return result

    async def backward(self, key: MicrobatchKey, grad_out: torch.Tensor) -> torch.Tensor | None:
        """Backward of a microbatch's forward here; returns the gradient for the previous hop.

        On an origin this is the embedding backward (returns None) and completes the microbatch.
        """
        self._check_open(key)
        grad_in = await self.run(self._backward_sync, key, grad_out)
        await self.finish(key)
        return grad_in

    def _check_open(self, key: MicrobatchKey) -> None:
        if key.iteration != self.iteration:
            raise StageError(f"microbatch {key} belongs to iteration {key.iteration}; open iteration "
                             f"is {self.iteration}")
        if key in self._iter(key.iteration).abandoned:
            raise StageError(f"microbatch {key} was abandoned")

    async def finish(self, key: MicrobatchKey) -> None:
        """Mark a microbatch's backward here as done; steps when the iteration is complete."""
        it = self._iter(key.iteration)
        it.done.add(key)
        self._progress()
        await self._maybe_close()

    async def abandon(self, key: MicrobatchKey) -> bool:
        """Give up a microbatch here: drop what is kept for it; it counts as closed for its iteration.

        Returns False when the microbatch was already finished or its iteration closed.
        """
        if key.iteration < self.iteration:
            return False
        it = self._iter(key.iteration)
        if key in it.done or key in it.abandoned:
            return False
        it.abandoned.add(key)
        await self.run(self._drop_sync, [key], slow=False)
        self._progress()
        await self._maybe_close()
        return True

    async def origin_finished(self, origin_id: str, iteration: int) -> bool:
        """``origin_id`` has finished ``iteration`` and every one before (we saw its microbatch of a later
        one, or it said so): nothing more of its microbatches of those comes here, whatever plan this node
        counts by, so the open iteration waits only for those already here; any of them still unfinished
        here was given up by the origin (its abandon notice may still be on the way), so drop it now."""
        if iteration <= self._finished_through.get(origin_id, -1):
            return False   # known already
        self._finished_through[origin_id] = iteration
        for index, it in list(self._iters.items()):
            if index <= iteration:
                for key in sorted((k for k in it.started - it.done - it.abandoned if k.origin_id == origin_id),
                                  key=lambda k: k.microbatch):
                    await self.abandon(key)
        await self._maybe_close()
        return True

    def stalled(self, after_s: float) -> bool:
        """The open iteration has started here, still lacks microbatches and has made no progress for
        ``after_s`` (time to ask the origins whether more is coming)."""
        return (self.open_activity() and self.pending() > 0
                and time.monotonic() - self._last_progress > after_s)

    def set_expected(self, expected: int) -> None:
        """Microbatches per iteration changed (new schedule); takes effect at the open iteration."""
        self.expected = max(1, expected)

    async def recheck(self) -> None:
        """Close the open iteration if a new ``expected`` makes it complete."""
        await self._maybe_close()

    async def _maybe_close(self) -> None:
        while (it := self._iter(self.iteration)).closed() >= self._expected_of(it):
            await self.close_iteration(forced=False)

    async def close_iteration(self, *, forced: bool) -> StepResult | None:
        """Take the inner step of the open iteration and open the next one."""
        async with self.close_lock:
            iteration = self.iteration
            it = self._iter(iteration)
            if not forced and it.closed() < self._expected_of(it):
                return None   # someone else closed it meanwhile
            if forced:
                stale = sorted((it.started - it.done - it.abandoned), key=lambda k: k.microbatch)
                logger.warning("stage %d closes iteration %d by timeout: %d done, %d abandoned, %d unfinished",
                               self.stage, iteration, len(it.done), len(it.abandoned), len(stale))
            result = await self.run(self._step_sync, iteration, len(it.done), len(it.abandoned), forced)
            self._iters.pop(iteration, None)
            self.iteration = iteration + 1
            self._progress()
        async with self.cond:
            self.cond.notify_all()
        if self.on_step is not None:
            self.on_step(result)
        return result

    async def watchdog(self, poll_s: float = 0.5) -> None:
        """Close an iteration that started but has made no progress for ``iteration_timeout_s``."""
        while True:
            await asyncio.sleep(poll_s)
            idle = time.monotonic() - self._last_progress
            if self.open_activity() and idle > self.iteration_timeout_s:
                await self.close_iteration(forced=True)

    # ------------------------------------------------------------------ data-parallel (model.stages = 1)

    def _local_sync(self, iteration: int, batches: list[tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[list[float], StepResult]:
        """One iteration of a whole-model stage: forward and backward of every microbatch, then the inner
        step. Gradients sum in ``.grad`` and ``_step_sync`` divides by the count: the mean over the
        microbatches, as a pipeline stage takes it."""
        for p in self._params:
            p.grad = None
        losses = []
        for tokens, targets in batches:
            tokens, targets = tokens.to(self.device), targets.to(self.device)
            with torch.enable_grad(), self._autocast():
                loss = self.module.loss(self.module.embed_tokens(tokens), targets)
            loss.backward()
            losses.append(loss.detach())
        for i, p in enumerate(self._params):
            if p.grad is not None:
                self._grad_sum[i], self._grad_count[i] = p.grad, len(batches)
        values = torch.stack(losses).tolist() if losses else []   # one device sync per iteration
        return values, self._step_sync(iteration, len(batches), 0, False)

    def _local_eval_sync(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        with torch.no_grad(), self._autocast():
            losses = [self.module.loss(self.module.embed_tokens(x.to(self.device)), y.to(self.device))
                      for x, y in batches]
        return torch.stack(losses).tolist() if losses else []

    async def train_local(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[float], StepResult]:
        """Data-parallel mode (the path is just this origin): train the open iteration on this node's own
        microbatches with no pipeline hop. One worker-thread call per iteration, so the event loop's
        share of a step is a few microseconds; the outer sync runs in ``after_step`` as in a pipeline."""
        async with self.close_lock:
            iteration = self.iteration
            losses, result = await self.run(self._local_sync, iteration, batches)
            self._iters.pop(iteration, None)
            self.iteration = iteration + 1
            self._progress()
        if self.on_step is not None:
            self.on_step(result)
        return losses, result

    async def evaluate_local(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """Validation losses of a whole-model stage, one per batch (nothing kept, nothing trained)."""
        return await self.run(self._local_eval_sync, batches)

    # ------------------------------------------------------------------ state

    def _state_sync(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.module.state_dict().items()}

    async def state(self) -> dict[str, torch.Tensor]:
        """A copy of the stage's weights, taken between microbatches on the worker thread."""
        return await self.run(self._state_sync, slow=False)

    def _load_sync(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.module.state_dict()
        missing = sorted(set(own) - set(tensors))
        unknown = sorted(set(tensors) - set(own))
        if missing or unknown:
            raise StageError(f"state does not match the stage: missing {missing[:3]}, unknown {unknown[:3]}")
        for name, t in tensors.items():
            if t.shape != own[name].shape:
                raise StageError(f"state tensor {name} has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
        self.module.load_state_dict(tensors)

    async def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        await self.run(self._load_sync, tensors, slow=False)
