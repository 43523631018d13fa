"""Weight sync of streaming online training: rank 0 publishes the policy, rollout actors pick it up.

* **version** of the policy after optimizer step ``s`` = ``s // online.sync_every`` (:func:`policy_version`);
  a publication happens at every step that is a multiple of ``sync_every`` and once when a worker group
  starts (the restored checkpoint's version, or 0), so after a training restart the rollouts swap back to
  the restored policy.
* **what** is published (:func:`policy_state`): the full denoiser state dict (gathered from the ZeRO-3
  partitions: a collective every rank enters), or only the LoRA adapter tensors when ``model.lora_rank > 0``.
* **how**: :class:`PolicyStore` (a Ray actor) ``ray.put``s each publication, so rollouts read the tensors
  from the object store; each publication has a serial number, so a rolled-back (lower) version is still
  a change a rollout swaps to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Substring of the state-dict keys of peft LoRA adapter tensors.
LORA_KEY = "lora_"


def policy_version(step: int, sync_every: int) -> int:
    """Policy version after ``step`` optimizer steps: ``step // sync_every`` (steps 0-3 -> 0 at 4)."""
    return step // sync_every


def policy_state(
    module: torch.nn.Module, *, zero_stage: int, rank: int, lora: bool
) -> dict[str, torch.Tensor] | None:
    """The CPU tensors a rollout needs (rank 0; ``None`` elsewhere). Collective under ZeRO-3."""
    from ray_jobs.export import gather_full_state_dict

    state = gather_full_state_dict(module, zero_stage=zero_stage, rank=rank)
    if state is None or not lora:
        return state
    return {k: v for k, v in state.items() if LORA_KEY in k}


def state_fn(module: torch.nn.Module, cfg: Any, rank: int) -> Callable[[], dict[str, torch.Tensor] | None]:
    """:func:`policy_state` of ``module`` under run config ``cfg`` (its ZeRO stage and LoRA rank)."""
    return lambda: policy_state(
        module, zero_stage=cfg.train.zero_stage, rank=rank, lora=cfg.model.lora_rank > 0
    )


class PolicyStore:
    """Ray actor holding the latest published policy (``ray.remote(PolicyStore)``)."""

    def __init__(self) -> None:
        self.serial = 0
        self.version = -1
        self.ref: Any = None
        self.history: list[dict[str, Any]] = []  # every publication: serial, version, step, start

    def publish(self, version: int, step: int, state: dict[str, torch.Tensor], start: bool = False) -> int:
        """Keep ``state`` (policy ``version`` after ``step`` steps; ``start``: a worker group's first)."""
        import ray

        self.serial += 1
        self.version = version
        self.ref = ray.put(state)
        self.history.append({"serial": self.serial, "version": version, "step": step, "start": start})
        return self.serial

    def latest(self, have_serial: int) -> tuple[int, int, list] | None:
        """``(serial, version, [ref])`` when newer than ``have_serial``, else ``None`` (the ref is wrapped in
        a list so the caller gets the reference, not the tensors, and fetches them itself)."""
        if self.serial <= have_serial:
            return None
        return self.serial, self.version, [self.ref]

    def current_version(self) -> int:
        return self.version

    def get_history(self) -> list[dict[str, Any]]:
        return list(self.history)
