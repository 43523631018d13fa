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
* **evaluation**: the publications of the steps :func:`eval_due` names are also handed to the evaluator
  actor (:class:`ray_jobs.online_eval.PolicyEvaluator`), which scores them on held-out prompts while
  training goes on; the store owns the tensors, so a training restart does not lose them.
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


def eval_due(step: int, eval_every: int | None, max_steps: int) -> bool:
    """Whether the policy after ``step`` gets a periodic held-out evaluation: every ``eval_every`` steps
    before the last one (the last step's is the final evaluation of the export). ``eval_every`` 4 and 10
    steps: steps 4 and 8; 8 steps: step 4 only."""
    return eval_every is not None and 0 < step < max_steps and step % eval_every == 0


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

    def __init__(self, evaluator: Any = None) -> None:
        self.evaluator = evaluator  # a PolicyEvaluator actor handle, or None
        self.serial = 0
        self.version = -1
        self.ref: Any = None
        self.history: list[dict[str, Any]] = []  # every publication: serial, version, step, start

    def publish(
        self,
        version: int,
        step: int,
        state: dict[str, torch.Tensor],
        start: bool = False,
        evaluate: bool = False,
    ) -> int:
        """Keep ``state`` (policy ``version`` after ``step`` steps; ``start``: a worker group's first;
        ``evaluate``: also queue it for the evaluator, without waiting for it)."""
        import ray

        self.serial += 1
        self.version = version
        self.ref = ray.put(state)
        if evaluate and self.evaluator is not None:
            self.evaluator.evaluate.remote(step, [self.ref])  # in a list: the evaluator gets the reference
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
