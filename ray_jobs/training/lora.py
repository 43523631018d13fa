"""LoRA adapters on the policy (peft) and the reference they imply: the same module, adapters disabled."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, targets: list[str]) -> torch.nn.Module:
    """Freeze ``model`` and inject trainable LoRA adapters (peft) into its attention projections."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d on %s: %d trainable parameters", rank, targets, trainable)
    return model


class AdaptersDisabled(torch.nn.Module):
    """The LoRA policy's base model as the reference: same module, adapters switched off for the call."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self._policy = [policy]  # a list keeps it out of this module's parameters/state_dict

    @property
    def policy(self) -> torch.nn.Module:
        return self._policy[0]

    def forward(self, *args, **kwargs):
        self.policy.disable_adapters()
        try:
            with torch.no_grad():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.enable_adapters()

    def parameters(self, recurse: bool = True):
        return self.policy.parameters(recurse)
