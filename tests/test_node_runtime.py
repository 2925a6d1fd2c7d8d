"""StageRuntime's iteration bookkeeping alone (no network): how long a later microbatch waits."""

from __future__ import annotations

import asyncio
import time

import torch

from lowband.node.pipeline.runtime import MicrobatchKey, StageRuntime


def test_a_later_microbatch_waits_less_when_nothing_of_the_open_iteration_is_under_way_here() -> None:
    async def main() -> None:
        module = torch.nn.Linear(2, 2)
        runtime = StageRuntime(module, 1, torch.optim.SGD(module.parameters(), lr=0.1), expected=2,
                               iteration_timeout_s=3.0)
        try:
            # iteration 0 expects 2; one is done, the other never comes (launched under another plan)
            first = MicrobatchKey("o1", 0, 0)
            await runtime.admit(first)
            await runtime.finish(first)
            start = time.monotonic()
            await runtime.admit(MicrobatchKey("o2", 1, 0))
            waited = time.monotonic() - start
            assert runtime.iteration == 1 and 0.8 < waited < 2.5, waited
            # iteration 1 has a microbatch under way here: a later one (of another origin: one of o2's
            # own would show that o2 gave the first up) waits the whole iteration timeout
            start = time.monotonic()
            await runtime.admit(MicrobatchKey("o3", 2, 0))
            waited = time.monotonic() - start
            assert runtime.iteration == 2 and waited >= 2.8, waited
        finally:
            runtime.shutdown()

    asyncio.run(main())
