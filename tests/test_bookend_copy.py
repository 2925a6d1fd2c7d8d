"""Stages 1 and S-1 refresh their copy of stage 0 every ``recovery.bookend_copy_every`` inner steps
(each refresh streams stage 0's whole state), and at once while they hold none."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from lowband.node.recovery.bookend import BookendCopy
from lowband.protocols.config import ConfigError, RunConfig, apply_overrides


@pytest.mark.parametrize("stage, refresh_steps, steps, expected", [
    (1, 40, range(1, 81), [1, 40, 80]),     # none held at first: fetched at once, then every 40 steps
    (3, 5, range(1, 11), [1, 5, 10]),
    (2, 5, range(1, 11), []),              # a middle stage keeps no copy
])
def test_refreshes_follow_the_configured_period(stage: int, refresh_steps: int, steps: range,
                                               expected: list[int]) -> None:
    async def main() -> list[int]:
        current = SimpleNamespace(agent=SimpleNamespace(stage=stage))
        copy = BookendCopy(current, None, None, None, num_stages=4, refresh_steps=refresh_steps)  # type: ignore[arg-type]
        fetched: list[int] = []

        async def refresh() -> None:
            fetched.append(step)
            copy.copy = {}

        copy._refresh = refresh   # type: ignore[method-assign]
        for step in steps:
            copy.after_step(step)
            await asyncio.sleep(0)   # let the fetch run before the next step, as a real one would
        return fetched

    assert asyncio.run(main()) == expected


def test_bookend_copy_every_is_validated() -> None:
    assert apply_overrides(RunConfig(), ["recovery.bookend_copy_every=40"]).recovery.bookend_copy_every == 40
    with pytest.raises(ConfigError, match="bookend_copy_every"):
        apply_overrides(RunConfig(), ["recovery.bookend_copy_every=-1"])
