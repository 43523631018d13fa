"""Tiny SDXL and SD1.5 pipelines (UNet, DDPM) built from configs, offline, for tests and the demo.

:func:`build_tiny_unet_pipeline` constructs (does not save) a real diffusers pipeline with seeded random
weights; ``prefopt_core.models.tiny.make_tiny_pipeline(dir, family="sdxl" | "sd15")`` saves it, and the
saved directory loads back with a plain ``StableDiffusionXLPipeline.from_pretrained(dir)`` /
``StableDiffusionPipeline.from_pretrained(dir)``.

Layout (``resolution=32``): a 2-block VAE (downsampling x2: ``(N, 3, 32, 32)`` images ->
``(N, 4, 16, 16)`` latents) and a 2-level UNet2DConditionModel in the shape of diffusers' own pipeline
fast tests (one ``DownBlock2D`` + one ``CrossAttnDownBlock2D`` level for SDXL, the mirror order for
SD1.5), shrunk to 16/32 channels and one resnet per block (a DPO step on 4 pairs takes a fraction of a
second on one CPU core).

* **SDXL**: ``CLIPTextModel`` (hidden 32) + ``CLIPTextModelWithProjection`` (hidden 32, projection 32);
  the UNet cross-attends to their concatenated penultimate hidden states (``cross_attention_dim`` =
  32 + 32 = 64) and adds ``addition_embed_type="text_time"``: 6 micro-conditioning ids embedded with
  ``addition_time_embed_dim`` = 8 each plus the pooled projection of encoder 2, so
  ``projection_class_embeddings_input_dim`` = 6 * 8 + 32 = 80. Scheduler: ``EulerDiscreteScheduler`` with
  SDXL-base's config (scaled_linear betas 0.00085-0.012, 1000 steps, ``steps_offset=1``, "leading"
  spacing, epsilon).
* **SD1.5**: one ``CLIPTextModel`` (hidden 32, ``cross_attention_dim`` = 32). Scheduler: ``PNDMScheduler``
  with SD1.5's config (same betas, ``skip_prk_steps``, ``set_alpha_to_one=False``, ``steps_offset=1``);
  no safety checker / feature extractor (saved as ``null``, with ``requires_safety_checker=False`` so
  loading does not warn).

Both VAEs get a ``scaling_factor`` calibrated to unit-variance latents (see :func:`_vae`), not the real
checkpoints' constants, which belong to their trained VAEs.

Training never uses these inference schedulers' sampling logic: the adapters build a ``DDPMScheduler``
from the same config (see :mod:`prefopt_core.models.sd15`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, get_args

import torch

logger = logging.getLogger(__name__)

UNetFamily = Literal["sdxl", "sd15"]
UNET_FAMILIES: tuple[str, ...] = get_args(UNetFamily)

#: Width of every tiny CLIP text encoder (hidden size and, for encoder 2, projection size).
CLIP_HIDDEN = 32
#: SDXL's 6 micro-conditioning ids (original h, w; crop top, left; target h, w) x this embedding width.
ADDITION_TIME_EMBED_DIM = 8
NUM_TIME_IDS = 6

#: DDPM betas shared by SD1.5 and SDXL (their released ``scheduler_config.json``).
_DDPM_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _clip_text_encoder(vocab: int, *, with_projection: bool, seed: int):
    """A tiny CLIP text encoder sharing the tokenizer's BOS/EOS ids (EOS pooling needs the real EOS id)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab,
        projection_dim=CLIP_HIDDEN,
        max_position_embeddings=77,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _vae(resolution: int, seed: int):
    """2-block AutoencoderKL: ``(N, 3, R, R)`` -> ``(N, 4, R/2, R/2)``, ``scaling_factor`` calibrated.

    Real checkpoints' scaling factors (SD1.5 0.18215, SDXL 0.13025) are ``1 / std`` of *their* trained
    VAE's latents, chosen so that scaled latents have unit variance (Rombach et al. 2022 rescale by the
    std of a first batch). A random tiny VAE has other latent statistics (with SDXL's constant its
    latents would have std ~0.04, leaving almost no image signal under the noise), so the constant is
    derived the same way here: ``1 / std`` of the posterior means of 8 seeded random block images.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1  # (8, 3, 4, 4) in [-1, 1]
    images = torch.nn.functional.interpolate(blocks, size=(resolution, resolution), mode="nearest")
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean  # (8, 4, R/2, R/2)
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 4))
    return vae


def _unet(family: UNetFamily, latent_size: int, seed: int):
    """UNet2DConditionModel of the diffusers pipeline tests' shape, one resnet per block."""
    from diffusers import UNet2DConditionModel

    common = {
        "sample_size": latent_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }
    torch.manual_seed(seed)
    if family == "sdxl":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),  # diffusers' legacy name: heads per level
            use_linear_projection=True,
            transformer_layers_per_block=(1, 1),
            cross_attention_dim=2 * CLIP_HIDDEN,  # concat of both encoders' hidden states
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            # 6 time ids x 8 + pooled projection of text encoder 2
            projection_class_embeddings_input_dim=NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM + CLIP_HIDDEN,
        )
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,  # diffusers' legacy name: the number of heads (SD1.5 uses 8)
        cross_attention_dim=CLIP_HIDDEN,
    )


def build_tiny_unet_pipeline(family: UNetFamily, tokenizer_dir: Path, *, seed: int, resolution: int = 32):
    """Construct (do not save) a tiny ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline``.

    Args:
        family: ``"sdxl"`` or ``"sd15"``.
        tokenizer_dir: a CLIP tokenizer directory (``prefopt_core.models.tokenizer.write_clip_tokenizer``);
            both SDXL tokenizers load from it.
        seed: seeds every component's random initialisation.
        resolution: image side in px (a multiple of 4); latents are ``resolution // 2``.
    """
    if family not in UNET_FAMILIES:
        raise ValueError(f"unknown UNet family {family!r}; valid: {', '.join(UNET_FAMILIES)}")
    if resolution % 4:
        raise ValueError(
            f"resolution must be a multiple of 4 (VAE x2, UNet x2 downsampling), got {resolution}"
        )
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    latent_size = resolution // 2
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            **_DDPM_BETAS,
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            prediction_type="epsilon",
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(resolution, seed + 1),
            text_encoder=_clip_text_encoder(vocab, with_projection=False, seed=seed + 2),
            text_encoder_2=_clip_text_encoder(vocab, with_projection=True, seed=seed + 3),
            tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir),
            unet=_unet("sdxl", latent_size, seed),
            scheduler=scheduler,
            image_encoder=None,
            feature_extractor=None,
            add_watermarker=False,
        )
    else:
        from diffusers import PNDMScheduler, StableDiffusionPipeline

        scheduler = PNDMScheduler(
            num_train_timesteps=1000,
            **_DDPM_BETAS,
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="epsilon",
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(resolution, seed + 1),
            text_encoder=_clip_text_encoder(vocab, with_projection=False, seed=seed + 2),
            tokenizer=tokenizer,
            unet=_unet("sd15", latent_size, seed),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    logger.debug("built tiny %s pipeline at %d px", family, resolution)
    return pipe
