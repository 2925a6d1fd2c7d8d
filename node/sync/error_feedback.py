"""Error feedback: what quantisation left out of one send, added to the next send of the same stream.

With it, the sum of what a receiver decodes over many sends tracks the sum of what was meant to
be sent, instead of accumulating every send's rounding error (the classic error-feedback trick for
compressed gradients). The averager keeps one per stream of updates: a node's part of each
fragment, and an owner's reply for each shard it owns (``node/sync/grpc_averager.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

import torch

logger = logging.getLogger(__name__)


class ErrorFeedback:
    """Quantisation residual per stream key (fp32, flat)."""

    def __init__(self) -> None:
        self._residuals: dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` plus the residual stored for ``key``; ``flat`` itself when there is none, or when the
        stream changed shape (the old residual then belongs to nothing and is dropped)."""
        residual = self._residuals.get(key)
        if residual is None:
            return flat
        if residual.shape != flat.shape or residual.device != flat.device:
            logger.warning("error feedback for %r dropped: shape changed %s -> %s", key, tuple(residual.shape),
                           tuple(flat.shape))
            del self._residuals[key]
            return flat
        return flat + residual

    def store(self, key: Hashable, meant: torch.Tensor, sent: torch.Tensor) -> None:
        """Remember what this send left out: ``meant`` (compensated) minus what the receiver decodes."""
        self._residuals[key] = (meant - sent).detach()

    def residual(self, key: Hashable) -> torch.Tensor | None:
        return self._residuals.get(key)

    def restore(self, key: Hashable, start: int, end: int, previous: torch.Tensor | None) -> None:
        """Elements ``start:end`` of the last send never reached anybody (a lost shard): their residual goes
        back to what it was before that send (``previous``, the ``residual`` read before it; none: zero)."""
        residual = self._residuals.get(key)
        if residual is None:
            return
        if previous is not None and previous.shape == residual.shape:
            residual[start:end] = previous[start:end]
        else:
            residual[start:end] = 0.0
