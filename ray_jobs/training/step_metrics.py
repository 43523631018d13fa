"""Per-step training metrics on their way to the log: reduced over workers in one collective, and the
few of them the console's progress line shows."""

from __future__ import annotations

from typing import Any

import torch


def reduce_step_metrics(
    steps: list[dict[str, torch.Tensor]], device: torch.device, world: int
) -> list[dict[str, float]]:
    """Mean over workers of each step's metrics (scalar tensors): all steps in one flat device tensor, one
    all-reduce (on the device: NCCL only reduces GPU tensors) and one copy to the host. ``grad_norm`` is
    the same global norm on every rank, so its mean is itself."""
    import torch.distributed as dist

    layout = [(i, k) for i, sums in enumerate(steps) for k in sorted(sums)]
    if not layout:
        return [{} for _ in steps]
    vec = torch.stack([steps[i][k].detach().float().to(device).reshape(()) for i, k in layout])
    if dist.is_initialized() and world > 1:
        dist.all_reduce(vec)
        vec /= world
    out: list[dict[str, float]] = [{} for _ in steps]
    for (i, k), v in zip(layout, vec.cpu().tolist(), strict=True):
        out[i][k] = v
    return out


def progress_extra(metrics: dict[str, float], last_checkpoint_step: int | None) -> dict[str, Any]:
    """What a training progress line carries besides step and ETA: loss, implicit accuracy and reward
    margin (where the loss has them), pairs/s and the last checkpoint."""
    extra: dict[str, Any] = {k: metrics[k] for k in ("loss", "implicit_acc", "reward_margin") if k in metrics}
    extra["pairs/s"] = metrics["pairs_per_s"]
    if last_checkpoint_step is not None:
        extra["checkpoint"] = f"step {last_checkpoint_step}"
    return extra
