"""Test-only fault injection: a replica that poisons the pseudo-gradient it sends (``LOWBAND_FAULT_POISON``).

Robust aggregation must hold against a replica that sends huge finite values, a sign-flipped update
or noise; the live tests start one node process with this environment variable set and check the
other replicas train as if nothing happened. Never set it in a real run: the node warns at start.

    LOWBAND_FAULT_POISON=scale:1e4     send 1e4 x Δ
    LOWBAND_FAULT_POISON=sign          send -Δ
    LOWBAND_FAULT_POISON=noise:1e3     send Gaussian noise of standard deviation 1e3 instead of Δ

Only what is sent changes: the replica's own outer step still uses the group's mean. Pure, no I/O
besides reading the environment once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import torch

ENV = "LOWBAND_FAULT_POISON"

Poison = Callable[[torch.Tensor], torch.Tensor]


def parse_poison(spec: str) -> Poison | None:
    """The poison `spec` names (see the module docstring); None for ""; ValueError for anything else."""
    spec = spec.strip()
    if not spec:
        return None
    kind, _, arg = spec.partition(":")
    if kind == "sign" and not arg:
        return lambda delta: -delta
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: expected 'scale:X', 'sign' or 'noise:STD'") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{ENV}={spec!r}: the number must be finite and > 0")
    if kind == "scale":
        return lambda delta: delta * value
    if kind == "noise":
        generator = torch.Generator().manual_seed(0)
        return lambda delta: torch.randn(delta.shape, generator=generator) * value
    raise ValueError(f"{ENV}={spec!r}: expected 'scale:X', 'sign' or 'noise:STD'")


def poison_from_env(environ: Mapping[str, str] = os.environ) -> Poison | None:
    return parse_poison(environ.get(ENV, ""))
