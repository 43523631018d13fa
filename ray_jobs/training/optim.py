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
    """AdamW over the trainable parameters of ``policy`` and its :func:`lr_lambda` schedule.

    The fused kernel (CPU and CUDA) updates in place: the default CPU implementation allocates temporaries
    the size of each parameter, which under ZeRO is the whole flat partition (3 x 4 bytes per partitioned
    parameter at the optimizer step, the peak of a ZeRO-3 step on CPU)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    fused = True if params and all(p.device.type in ("cpu", "cuda") for p in params) else None
    optimizer = torch.optim.AdamW(
        params,
        lr=t.lr,
        betas=tuple(t.adam_betas),
        weight_decay=t.weight_decay,
        fused=fused,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))
