"""Export a trained denoiser in the formats diffusers loads.

* Full weights: ``<export>/<transformer|unet>`` via ``save_pretrained`` (safetensors), loadable with
  ``StableDiffusion3Pipeline.from_pretrained(base, transformer=SD3Transformer2DModel.from_pretrained(dir))``
  (``UNet2DConditionModel`` for SDXL/SD1.5). With LoRA this is the base with the adapters fused in.
* LoRA adapters (``model.lora_rank > 0``): ``<export>/lora/pytorch_lora_weights.safetensors`` via the
  family pipeline's ``save_lora_weights``, loadable with ``pipe.load_lora_weights(dir)``.

Under ZeRO-3 parameters are partitioned: :func:`gather_full_state_dict` gathers them (a collective: every
rank must call it) and returns the full state on rank 0 only.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: family -> (pipeline class name, keyword of save_lora_weights)
LORA_SAVERS: dict[str, tuple[str, str]] = {
    "sd3": ("StableDiffusion3Pipeline", "transformer_lora_layers"),
    "sdxl": ("StableDiffusionXLPipeline", "unet_lora_layers"),
    "sd15": ("StableDiffusionPipeline", "unet_lora_layers"),
}


def gather_full_state_dict(
    module: nn.Module, *, zero_stage: int, rank: int
) -> dict[str, torch.Tensor] | None:
    """Full (unpartitioned) CPU state dict on rank 0; ``None`` elsewhere. Collective under ZeRO-3."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank != 0:
                return None
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if rank != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _atomic_dir(out: Path) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _commit_dir(tmp: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def fused_copy(module: nn.Module) -> nn.Module:
    """A plain (adapter-free) copy of ``module`` with any LoRA adapters fused into the base weights."""
    plain = copy.deepcopy(module)
    if getattr(plain, "peft_config", None):
        plain.fuse_lora()
        plain.unload_lora()
    return plain


def export_full(module: nn.Module, state: dict[str, torch.Tensor], out: Path) -> Path:
    """``save_pretrained`` a fresh copy of ``module``'s class/config carrying ``state`` (fp32 safetensors)."""
    if getattr(module, "peft_config", None):  # LoRA (never partitioned: ZeRO <= 2): keep its structure
        holder = copy.deepcopy(module)
        holder.load_state_dict(state)
        plain = fused_copy(holder)
    else:  # a fresh module: under ZeRO-3 ``module`` only holds partitions
        plain = type(module).from_config(module.config)
        plain.load_state_dict(state)
    plain = plain.to(torch.float32)
    tmp = _atomic_dir(out)
    plain.save_pretrained(tmp, safe_serialization=True)
    _commit_dir(tmp, out)
    logger.info("exported full weights to %s", out)
    return out


def export_lora(family: str, module: nn.Module, state: dict[str, torch.Tensor], out: Path) -> Path:
    """Save the LoRA adapters of ``module`` (weights from ``state``) in diffusers' pipeline LoRA format."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    holder = copy.deepcopy(module)
    holder.load_state_dict(state)
    pipe_name, kwarg = LORA_SAVERS[family]
    layers = get_peft_model_state_dict(holder)
    tmp = _atomic_dir(out)
    getattr(diffusers, pipe_name).save_lora_weights(tmp, **{kwarg: layers}, safe_serialization=True)
    _commit_dir(tmp, out)
    logger.info("exported %d LoRA tensors to %s", len(layers), out)
    return out
