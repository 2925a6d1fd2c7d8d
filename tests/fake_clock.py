"""A clock the test moves by hand, for code that takes a ``clock: Callable[[], float]``."""

from __future__ import annotations


class Clock:
    """Returns ``t``; a test advances time with ``clock.t += seconds``."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
