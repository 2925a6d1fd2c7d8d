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

    def compensate(self, key: Hashable, flat: torch.Tensor, decay: float = 1.0) -> torch.Tensor:
        """``flat`` plus the residual stored for ``key`` (times ``decay``: SparseLoCo's β, which lets
        entries that never make the cut fade); ``flat`` itself when there is none, or when the
        stream changed shape (the old residual then belongs to nothing and is dropped)."""
        residual = self._residuals.get(key)
        if residual is None:
            return flat
        if residual.shape != flat.shape or residual.device != flat.device:
            logger.warning("error feedback for %r dropped: shape changed %s -> %s", key, tuple(residual.shape),
                           tuple(flat.shape))
            del self._residuals[key]
            return flat
        return flat + (residual * decay if decay != 1.0 else residual)

    def store(self, key: Hashable, meant: torch.Tensor, sent: torch.Tensor) -> None:
        """Remember what this send left out: ``meant`` (compensated) minus what the receiver decodes."""
        self._residuals[key] = (meant - sent).detach()

    def residual(self, key: Hashable) -> torch.Tensor | None:
        return self._residuals.get(key)

    def set(self, key: Hashable, residual: torch.Tensor | None) -> None:
        """Adopt a residual (a replica's state copy); None forgets the stream's."""
        if residual is None:
            self._residuals.pop(key, None)
        else:
            self._residuals[key] = residual.detach().to(torch.float32, copy=True).reshape(-1)

    def keys(self) -> list[Hashable]:
        return list(self._residuals)

    def give_back(self, key: Hashable, sent: torch.Tensor, lost: torch.Tensor | None = None) -> None:
        """What the last send put on the wire never got applied (``lost``: flat bool, where; None: all of
        it): it is owed again, so it goes back into the residual."""
        residual = self._residuals.get(key)
        if residual is None or residual.shape != sent.shape:
            return
        if lost is None:
            residual += sent
        else:
            residual += torch.where(lost, sent, torch.zeros_like(sent))

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
