"""The origin's side of training (stage 0): its data shard, its iterations, its validation."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator

import torch

from lowband.node.event_log import EventLog
from lowband.node.membership import Membership
from lowband.node.metrics import TrainingCounters
from lowband.node.pipeline.agent import PipelineAgent
from lowband.node.schedule_keeper import ScheduleKeeper
from lowband.node.train.data import (
    bytes_per_token,
    load_run_corpus,
    origin_batches,
    run_val_batches,
    split_microbatches,
)
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.tokenizer import BpeTokenizer
from lowband.protocols.vocab import bits_per_byte

logger = logging.getLogger(__name__)

NO_PIPELINE_FACTOR = 10      # an origin that trained gives up after this many leases without any path
SCHEDULE_POLL_S = 0.5        # an origin without a usable schedule looks again this often

Batch = tuple[torch.Tensor, torch.Tensor]


class OriginLoop:
    """Drives iterations through the pipeline when this node holds stage 0; counts into ``counters``."""

    def __init__(self, config: RunConfig, *, data: str, membership: Membership, counters: TrainingCounters,
                 schedule: ScheduleKeeper, events: EventLog, lease_s: float,
                 tokenizer: BpeTokenizer | None = None) -> None:
        self.config = apply_overrides(config, [f"train.data={data}"]) if data else config   # --data
        self.tokenizer = tokenizer   # the run's BPE, as the coordinator named it (None: bytes)
        self.bytes_per_token: float | None = None   # of the validation targets: losses in bits per byte
        self._data_info: dict[str, object] = {}
        self.membership = membership
        self.counters = counters
        self.schedule = schedule
        self.events = events
        self.lease_s = lease_s
        self._batches: Iterator[Batch] | None = None   # loaded at the first iteration
        self._val: list[Batch] | None = None
        self._no_paths_since: float | None = None

    async def turn(self, agent: PipelineAgent) -> str:
        """One iteration, or a bounded wait for a schedule with paths. Returns why to stop, or ""."""
        if not agent.schedule.paths or not self._settled():
            if self._no_pipeline_too_long(agent):
                await self.evaluate(agent, agent.runtime.iteration)
                return f"no complete pipeline for {NO_PIPELINE_FACTOR * self.lease_s:g} s"
            await self.schedule.wait_changed(SCHEDULE_POLL_S)
            return ""
        self._no_paths_since = None
        await self._iteration(agent)
        return ""

    def _settled(self) -> bool:
        """Before its first iteration an origin waits until membership has not changed for two
        heartbeats, so the nodes joining at the start of a run all hold the same schedule."""
        return self._batches is not None or self.schedule.settled()

    def _no_pipeline_too_long(self, agent: PipelineAgent) -> bool:
        """An origin that trained but has had no path for many leases gives up (the run is over or
        a stage is lost for good): waiting is bounded like every other wait."""
        if self._batches is None or agent.schedule.paths:
            return False
        now = time.monotonic()
        if self._no_paths_since is None:
            self._no_paths_since = now
        return now - self._no_paths_since > NO_PIPELINE_FACTOR * self.lease_s

    def _data(self) -> tuple[Iterator[Batch], list[Batch]]:
        """This origin's shard of the training data (by its origin index) and the run's validation set."""
        config = self.config
        if config.train.tokenizer == "bpe" and self.tokenizer is None:
            # never train one of its own: its merges would differ from the other origins'
            raise ValueError("train.tokenizer = 'bpe': an origin encodes with the coordinator's tokenizer, none given")
        corpus = load_run_corpus(config, self.tokenizer)
        index, count = max(0, self.membership.origin_index), max(1, self.membership.num_origins)
        batches = origin_batches(config, corpus, index, count)
        val: list[Batch] = []
        for x, y in run_val_batches(config, corpus):
            val.extend(split_microbatches(x, y, config.train.microbatch_size))
        self.bytes_per_token = bytes_per_token(corpus, val)
        # which tokenizer encoded this origin's data: every origin of a BPE run names the coordinator's
        self._data_info = {"source": corpus.source, "train_tokens": corpus.train.numel(),
                           "bytes_per_token": self.bytes_per_token,
                           "tokenizer": corpus.tokenizer.sha256 if corpus.tokenizer else config.train.tokenizer}
        return batches, val

    async def _iteration(self, agent: PipelineAgent) -> None:
        train, counters = self.config.train, self.counters
        if self._batches is None:
            self._batches, self._val = await asyncio.to_thread(self._data)
            self.events.write("data", **self._data_info)
            for _ in range(agent.runtime.iteration):   # a late origin resumes the data order where the run is
                next(self._batches)
            counters.started = time.monotonic()
            counters.tokens_at_start = counters.tokens
            await self.evaluate(agent, agent.runtime.iteration)
        if agent.catch_up_to > agent.runtime.iteration:   # we fell behind the run (late joiner)
            skip = agent.catch_up_to - agent.runtime.iteration
            logger.info("origin %s catches up %d iterations to %d", self.membership.node_id, skip, agent.catch_up_to)
            agent.runtime.jump_to(agent.catch_up_to)
            for _ in range(skip):
                next(self._batches)
        iteration = agent.runtime.iteration
        if iteration >= train.steps:
            return
        x, y = next(self._batches)
        microbatches = split_microbatches(x, y, train.microbatch_size)
        result = await agent.run_iteration(iteration, microbatches)
        counters.tokens += result.tokens
        if result.losses:
            counters.loss = result.loss
        self.events.write("iteration", step=iteration + 1, loss=result.loss if result.losses else None,
                          abandoned=result.abandoned, tokens=counters.tokens, seconds=result.seconds)
        done = iteration + 1
        if done % train.eval_every == 0 and done < train.steps:
            await self.evaluate(agent, done)
        if not result.losses:
            # Every microbatch failed (a hop is down): do not race through iterations without training,
            # dragging the stages along; wait for the coordinator's next schedule (bounded).
            await self.schedule.wait_changed(self.lease_s)

    async def evaluate(self, agent: PipelineAgent, iteration: int) -> None:
        """Validation loss of the whole model (``eval``); nothing before the data is loaded or without paths."""
        if not self._val or not agent.schedule.paths:
            return
        value = await agent.evaluate(iteration, self._val)
        if math.isfinite(value):
            self.counters.val_loss = value
        self.events.write("eval", step=iteration, val_loss=value,
                          val_bits_per_byte=bits_per_byte(value, self.bytes_per_token))
        logger.info("node %s step %d: val loss %.4f", self.membership.node_id, iteration, value)
