"""Stable Diffusion 1.5 adapter: a DDPM UNet with ε- or v-prediction, one CLIP text encoder.

Forward process (Ho et al. 2020, Eq. 4) at integer training timestep ``t`` (larger = noisier)::

    x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε                 ᾱ_t = alphas_cumprod[t]
    target = ε                                       (prediction_type="epsilon")
    target = v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0          (prediction_type="v_prediction", Salimans & Ho 2022)

Conventions of the official Diffusion-DPO code (SalesforceAIResearch/DiffusionDPO ``train.py``) that we
follow: the training schedule is a ``DDPMScheduler`` built from the pipeline's ``scheduler`` config
(whatever inference scheduler the pipeline ships: PNDM for SD1.5, Euler for SDXL), noise is added with
its ``add_noise``, timesteps are drawn uniformly from ``[0, T)`` and fed to the UNet as the integer
``t``, and the text conditioning is the CLIP text encoder's last hidden state (what
``StableDiffusionPipeline.encode_prompt`` returns, which we call so that training and inference see the
same embeddings). Differences, on purpose: the official code asserts ``prediction_type == "epsilon"``;
we also support v-prediction (``prediction_type`` from the scheduler config unless overridden). It
encodes a fresh posterior *sample* every step; we cache the posterior *mean* (deterministic caches).
It replaces 20 % of captions by "" (``--proportion_empty_prompts 0.2``); the cache stores one embedding
per caption, so caption dropout is not done here.

    adapter = SD15Adapter("path/to/sd15")                       # a diffusers pipeline directory
    cond = adapter.encode_prompts(["a red circle"])             # {"prompt_embeds": (1, 77, D)}
    x0 = adapter.encode_images(pixels)                          # (N, 4, H/8, W/8)
    pred = adapter.predict(unet, adapter.noisy_latents(x0, eps, t), t, cond)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from prefopt_core.models.base import TORCH_DTYPES, dir_fingerprint, read_model_index
from prefopt_core.storage import local_path
from prefopt_core.timesteps import NoiseSchedule

logger = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)


def resolve_torch_dtype(name: str) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` -> torch dtype; ``ValueError`` listing the valid names otherwise."""
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


class SD15Adapter:
    """:class:`prefopt_core.models.base.ModelAdapter` for SD1.x/SD2.x-style ``StableDiffusionPipeline``s.

    Also the base of :class:`prefopt_core.models.sdxl.SDXLAdapter`, which overrides the pipeline class,
    the text conditioning and the UNet's added conditioning; the DDPM maths is shared.
    """

    family: ClassVar[str] = "sd15"
    denoiser_subfolder: ClassVar[str] = "unet"
    #: Pipeline sub-folders whose content determines the cache (hashed into the fingerprint).
    encoder_subfolders: ClassVar[list[str]] = ["vae", "text_encoder", "tokenizer"]
    #: Frozen modules of the encoder pipeline (VAE + text encoders).
    encoder_modules: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")

    def __init__(
        self,
        pretrained: str | Path,
        *,
        dtype: str = "fp32",
        device: str | torch.device = "cpu",
        max_sequence_length: int = 77,
        prediction_type: str | None = None,
    ) -> None:
        """``max_sequence_length`` is accepted for interface compatibility and ignored: CLIP tokenizers
        pad/truncate to their own ``model_max_length`` (77)."""
        from diffusers import DDPMScheduler

        self.pretrained = Path(pretrained)
        self.model_index = read_model_index(self.pretrained)
        self.dtype = resolve_torch_dtype(dtype)
        self.device = torch.device(device)
        config = DDPMScheduler.load_config(self.pretrained, subfolder="scheduler")
        resolved = prediction_type or config.get("prediction_type", "epsilon")
        if resolved not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {resolved!r} is not supported for {self.family}; valid: "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        self.prediction_type: PredictionType = resolved
        if resolved != config.get("prediction_type", "epsilon"):
            logger.info(
                "%s: training with prediction_type=%s (scheduler config says %s)",
                self.family,
                resolved,
                config.get("prediction_type"),
            )
        # The training schedule (official Diffusion-DPO: DDPMScheduler.from_pretrained(..., "scheduler")).
        self.scheduler = DDPMScheduler.from_config(config, prediction_type=resolved)
        self.schedule = NoiseSchedule.from_ddpm_scheduler(self.scheduler)
        self._encoder_pipe = None

    # ------------------------------------------------------------------ pipeline class hooks
    @staticmethod
    def pipeline_class():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def _encoder_load_kwargs(self) -> dict[str, Any]:
        """Components left out of the encoder pipeline (no UNet, no safety checker)."""
        return {
            "unet": None,
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
            "requires_safety_checker": False,
        }

    def _vae_dtype(self) -> torch.dtype:
        return self.dtype

    # ------------------------------------------------------------------ cache stage
    def _encoders(self):
        """The pipeline without its UNet: VAE + text encoder(s), frozen, in eval mode, on ``device``."""
        if self._encoder_pipe is None:
            kwargs = self._encoder_load_kwargs()
            if self._vae_dtype() != self.dtype:
                from diffusers import AutoencoderKL

                kwargs["vae"] = AutoencoderKL.from_pretrained(
                    self.pretrained, subfolder="vae", dtype=self._vae_dtype()
                )
            pipe = self.pipeline_class().from_pretrained(self.pretrained, dtype=self.dtype, **kwargs)
            for name in self.encoder_modules:
                module = getattr(pipe, name, None)
                if module is not None:
                    module.requires_grad_(False).eval()
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self._encoder_pipe = pipe
        return self._encoder_pipe

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, Tensor]:
        """-> ``{"prompt_embeds": (N, 77, D)}``: the CLIP text encoder's last hidden state (fp32, CPU)."""
        embeds, _ = self._encoders().encode_prompt(
            prompt=list(captions),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"prompt_embeds": embeds.float().cpu()}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, C, H/f, W/f)``: ``(mean(q(z|x)) − shift) · scaling_factor``.

        The posterior *mean* is cached (the official scripts draw ``latent_dist.sample()`` each step, a
        difference far below the diffusion noise). SD1.5/SDXL VAEs have no shift (``shift_factor`` None).
        """
        vae = self._encoders().vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float().cpu()

    def side_conditioning(
        self, original_size: Tensor, crop_top_left: Tensor, target_size: int
    ) -> dict[str, Tensor]:
        """SD1.5 has no micro-conditioning: ``{}``."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "pretrained": str(self.pretrained),
            "encoders": dir_fingerprint(self.pretrained, list(self.encoder_subfolders)),
            "prediction_type": self.prediction_type,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ------------------------------------------------------------------ training
    def load_denoiser(self, path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The pipeline's UNet (``path=None``) or a ``save_pretrained`` UNet directory (e.g. an export)."""
        from diffusers import UNet2DConditionModel

        # disable_mmap: see the SD3 adapter (a mapped file stays resident beside DeepSpeed's copies)
        if path is None:
            return UNet2DConditionModel.from_pretrained(
                self.pretrained, subfolder="unet", dtype=dtype, disable_mmap=True
            )
        return UNet2DConditionModel.from_pretrained(local_path(path), dtype=dtype, disable_mmap=True)

    def noisy_latents(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``(N, C, h, w)`` x2, ``t (N,)`` -> ``√ᾱ_t x0 + √(1 − ᾱ_t) ε`` ``(N, C, h, w)`` (Ho et al., Eq. 4)."""
        return self.scheduler.add_noise(x0, noise, t.to(x0.device).long())

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """ε, or ``v = √ᾱ_t ε − √(1 − ᾱ_t) x0`` for v-prediction; ``(N, C, h, w)``."""
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t.to(x0.device).long())  # (Salimans & Ho, Sec. 4)

    def _added_cond_kwargs(self, cond: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor] | None:
        return None

    def predict(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """UNet output ``(N, C, h, w)`` for ``x_t (N, C, h, w)``, integer ``t (N,)`` and ``N``-row ``cond``."""
        dtype = next(denoiser.parameters()).dtype
        return denoiser(
            x_t.to(dtype),
            t.to(x_t.device).long(),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),  # (N, 77, D)
            added_cond_kwargs=self._added_cond_kwargs(cond, dtype),
            return_dict=False,
        )[0]

    def pipeline(self, denoiser: nn.Module | None = None, dtype: torch.dtype = torch.float32):
        """The saved pipeline (optionally with a trained UNet), its scheduler set to our prediction type."""
        extra: dict[str, Any] = {} if denoiser is None else {"unet": denoiser}
        pipe = self.pipeline_class().from_pretrained(self.pretrained, dtype=dtype, **extra)
        if pipe.scheduler.config.get("prediction_type") != self.prediction_type:
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, prediction_type=self.prediction_type
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe
