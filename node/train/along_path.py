"""Run a microbatch along a path of stages inside one process.

A path starts at stage 0 (embedding), visits block stages in any order the
planner chose (skips and adjacent swaps included), and returns to stage 0 (head
and loss): ``[0, 1, 2, 3, 0]`` is the full pipeline. This is the numerical
reference for the distributed runtime, and what tests and the reference
trainer use to check that skipping and swapping still produce a valid model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lowband.node.train.model import Bookend

Stages = Mapping[int, nn.Module] | Sequence[nn.Module]
# What crossing the network does to the hidden states between two stages (a codec's round trip);
# None: they cross unchanged, as inside one process.
Hop = Callable[[torch.Tensor], torch.Tensor]


def _has_stage(stages: Stages, index: int) -> bool:
    if isinstance(stages, Mapping):
        return index in stages
    return 0 <= index < len(stages)


def validate_path(stages: Stages, path: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``path`` starts and ends at 0 and names only known block stages."""
    path = list(path)
    if len(path) < 2 or path[0] != 0 or path[-1] != 0:
        raise ValueError(f"path {path} must start and end at stage 0")
    for index in path[1:-1]:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"path {path}: stage ids must be integers, got {index!r}")
        if index == 0:
            raise ValueError(f"path {path}: stage 0 may appear only at the start and the end")
        if not _has_stage(stages, index):
            raise ValueError(f"path {path}: unknown stage {index}")
    if not _has_stage(stages, 0) or not isinstance(stages[0], Bookend):
        raise ValueError("stages must include stage 0 (a Bookend)")


def run_blocks(stages: Stages, path: Sequence[int], h_BTD: torch.Tensor, hop: Hop | None = None) -> torch.Tensor:
    """Apply the block stages of ``path`` (everything between the two zeros) to hidden states.

    ``hop`` is applied wherever the states leave one node for the next: from the origin to the first
    block stage, between block stages, and from the last back to the origin."""
    for index in list(path)[1:-1]:
        if hop is not None:
            h_BTD = hop(h_BTD)
        h_BTD = stages[index](h_BTD)
    return hop(h_BTD) if hop is not None else h_BTD


def run_path(stages: Stages, path: Sequence[int], tokens_BT: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of ``tokens_BT`` sent along ``path``."""
    validate_path(stages, path)
    bookend = stages[0]
    h_BTD = bookend.embed(tokens_BT)
    h_BTD = run_blocks(stages, path, h_BTD)
    return bookend.head(h_BTD)


def path_loss(
    stages: Stages, path: Sequence[int], tokens_BT: torch.Tensor, targets_BT: torch.Tensor, hop: Hop | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``tokens_BT`` sent along ``path`` (through ``hop``s)."""
    validate_path(stages, path)
    bookend = stages[0]
    h_BTD = run_blocks(stages, path, bookend.embed(tokens_BT), hop)
    return bookend.loss(h_BTD, targets_BT)


def full_path(num_stages: int) -> list[int]:
    """The plain pipeline ``[0, 1, ..., S-1, 0]``."""
    return [0, *range(1, num_stages), 0]
