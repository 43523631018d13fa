"""The optimizer and learning-rate schedule of a run."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from prefopt_core.config import TrainSection


def lr_lambda(t: TrainSection) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``s``: linear warm-up, then constant/linear/cosine."""

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        if t.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_optimizer(
    policy: torch.nn.Module, t: TrainSection
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters of ``policy`` and its :func:`lr_lambda` schedule."""
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=t.lr,
        betas=tuple(t.adam_betas),
        weight_decay=t.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
