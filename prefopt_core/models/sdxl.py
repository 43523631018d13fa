"""Stable Diffusion XL adapter: the DDPM UNet maths of :mod:`prefopt_core.models.sd15` plus two text
encoders and per-image micro-conditioning.

Conditioning of the UNet (Podell et al. 2023, Sec. 2.1-2.2), exactly what
``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids`` build (we call ``encode_prompt``, so
training and inference see the same embeddings):

* ``prompt_embeds (N, 77, D1 + D2)``: the *penultimate* hidden states of CLIP-L (``text_encoder``) and
  OpenCLIP-G (``text_encoder_2``) concatenated on channels;
* ``pooled_prompt_embeds (N, P)``: the projected pooled output of ``text_encoder_2`` (UNet
  ``added_cond_kwargs["text_embeds"]``);
* ``time_ids (N, 6)`` = ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` (UNet
  ``added_cond_kwargs["time_ids"]``), one row per *image*: the cache stores ``time_ids_w`` / ``time_ids_l``
  and :func:`prefopt_core.objective.pair_errors` stacks them into the ``2B``-row batch.

Official Diffusion-DPO SDXL conventions (SalesforceAIResearch/DiffusionDPO ``train.py --sdxl``): the same
penultimate/pooled text features; a ``DDPMScheduler`` from the scheduler config; uniform integer
timesteps; ε-prediction. Its time ids are the constant ``(R, R, 0, 0, R, R)`` for every image, whereas
diffusers' SDXL fine-tuning scripts use each image's real original size and crop.
``micro_conditioning="per_image"`` (default) does the latter; ``"constant"`` reproduces the official
choice (useful because Pick-a-Pic images are smaller than 1024 px, so per-image ids tell the model
"upscaled from 512", which inference with the default ``original_size=(1024, 1024)`` never asks for).
The VAE always runs in fp32: SDXL's VAE overflows in fp16 (the official launcher swaps in
``madebyollin/sdxl-vae-fp16-fix``; diffusers' scripts upcast), and it only runs in the cache stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

from prefopt_core.models.sd15 import SD15Adapter

logger = logging.getLogger(__name__)

MicroConditioning = Literal["per_image", "constant"]
MICRO_CONDITIONINGS: tuple[str, ...] = get_args(MicroConditioning)


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: int) -> Tensor:
    """SDXL micro-conditioning ids, ``(N, 6)`` float32: ``(orig_h, orig_w, crop_top, crop_left, R, R)``.

    ``original_size``: ``(N, 2)`` as ``(height, width)`` of the decoded image; ``crop_top_left``: ``(N, 2)``
    as ``(top, left)`` of the crop in the resized image; ``target_size``: the square training resolution
    ``R``. The order is that of ``StableDiffusionXLPipeline._get_add_time_ids``
    (``original_size + crops_coords_top_left + target_size``).
    """
    for name, value in (("original_size", original_size), ("crop_top_left", crop_top_left)):
        if value.ndim != 2 or value.shape[1] != 2:
            raise ValueError(f"{name} must have shape (N, 2), got {tuple(value.shape)}")
    if original_size.shape[0] != crop_top_left.shape[0]:
        raise ValueError(
            f"original_size has {original_size.shape[0]} rows but crop_top_left {crop_top_left.shape[0]}"
        )
    target = torch.full((original_size.shape[0], 2), float(target_size))  # (N, 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target], dim=1)  # (N, 6)


class SDXLAdapter(SD15Adapter):
    """:class:`prefopt_core.models.base.ModelAdapter` for ``StableDiffusionXLPipeline`` (base models)."""

    family: ClassVar[str] = "sdxl"
    denoiser_subfolder: ClassVar[str] = "unet"
    encoder_subfolders: ClassVar[list[str]] = [
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ]
    encoder_modules: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2")

    def __init__(
        self,
        pretrained: str | Path,
        *,
        dtype: str = "fp32",
        device: str | torch.device = "cpu",
        max_sequence_length: int = 77,
        prediction_type: str | None = None,
        micro_conditioning: str = "per_image",
    ) -> None:
        """See :class:`SD15Adapter`; ``micro_conditioning``: ``"per_image"`` | ``"constant"`` (module doc)."""
        if micro_conditioning not in MICRO_CONDITIONINGS:
            raise ValueError(
                f"unknown micro_conditioning {micro_conditioning!r}; valid: {', '.join(MICRO_CONDITIONINGS)}"
            )
        self.micro_conditioning: MicroConditioning = micro_conditioning  # type: ignore[assignment]
        super().__init__(
            pretrained,
            dtype=dtype,
            device=device,
            max_sequence_length=max_sequence_length,
            prediction_type=prediction_type,
        )

    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def _encoder_load_kwargs(self) -> dict[str, Any]:
        return {"unet": None, "image_encoder": None, "feature_extractor": None}

    def _vae_dtype(self) -> torch.dtype:
        return torch.float32

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, Tensor]:
        """-> ``prompt_embeds (N, 77, D1 + D2)`` and ``pooled_prompt_embeds (N, P)`` (fp32, CPU)."""
        embeds, _, pooled, _ = self._encoders().encode_prompt(
            prompt=list(captions),
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}

    def side_conditioning(
        self, original_size: Tensor, crop_top_left: Tensor, target_size: int
    ) -> dict[str, Tensor]:
        """``original_size (N, 2)`` (h, w), ``crop_top_left (N, 2)`` (top, left) -> ``{"time_ids": (N, 6)}``.

        ``micro_conditioning="constant"`` ignores both and returns ``(R, R, 0, 0, R, R)`` per row (official
        Diffusion-DPO).
        """
        if self.micro_conditioning == "constant":
            n = original_size.shape[0]
            original_size = torch.full((n, 2), target_size, dtype=torch.int64)
            crop_top_left = torch.zeros((n, 2), dtype=torch.int64)
        return {"time_ids": sdxl_time_ids(original_size, crop_top_left, target_size)}

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        # The time ids are cached rows: a cache built with the other convention must be refused.
        fp["encoders"]["micro_conditioning"] = self.micro_conditioning
        return fp

    def _added_cond_kwargs(self, cond: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "text_embeds": cond["pooled_prompt_embeds"].to(dtype),  # (N, P)
            "time_ids": cond["time_ids"].to(dtype),  # (N, 6)
        }
