"""The inner optimizer (AdamW) and its learning-rate schedule (linear warm-up, cosine decay).

Shared by the single-process reference trainer and every node's stage, so a
stage trained in the network sees exactly the schedule the reference sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lowband.protocols.config import TrainSection


def build_inner_optimizer(
    params: Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
    train: TrainSection,
    lr_scale: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and other 1-D tensors are not decayed).

    ``lr_scale`` multiplies the whole schedule: CheckFree restarts a rebuilt
    stage at ~1.1x the learning rate. The scale is stored in each param group
    (``lr_scale``) so ``set_lr`` keeps applying it.
    """
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    trainable = [p for p in tensors if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters given to the inner optimizer")
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(
        groups, lr=train.lr * lr_scale, betas=(train.beta1, train.beta2), eps=1e-8, fused=False
    )


def lr_at(step: int, train: TrainSection) -> float:
    """Learning rate at inner step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio * lr``."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    min_lr = train.min_lr_ratio * train.lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - min_lr)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times the group's ``lr_scale`` (1 if absent)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
