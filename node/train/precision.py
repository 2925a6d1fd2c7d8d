"""Compute precision: which autocast a forward/backward runs under (``train.precision``).

One rule for the single-process reference and the stage runtime, so their numerics match: ``auto``
is bf16 autocast on CUDA and plain fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on most
hosts), ``bf16`` forces bf16 autocast on any device (CPU too: that is how the CPU tests check the
bf16 path), ``fp32`` never autocasts. Autocast only changes the dtype of the ops it covers: parameters,
their gradients, the optimizer state and DiLoCo's pseudo-gradients stay fp32 (the master weights).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from lowband.protocols.config import PRECISIONS

# devices torch autocasts in bf16 (MPS autocast exists but not for every op we use)
_AUTOCAST_DEVICES = ("cuda", "cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype ops run in under ``precision`` on ``device``: bf16, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if device.type not in _AUTOCAST_DEVICES:
        raise ValueError(f"train.precision = 'bf16' is not supported on {device.type} (cuda or cpu only)")
    return torch.bfloat16


def autocast_context(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[Any]:
    """The context a forward (and the loss) runs in; backward follows the dtypes the forward recorded."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
