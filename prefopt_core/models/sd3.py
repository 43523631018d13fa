"""Stable Diffusion 3 adapter: rectified flow matching with an MMDiT transformer.

Forward process (Esser et al. 2024, Eq. 2): ``x_t = (1 − σ) x0 + σ ε``; the transformer predicts the
velocity ``v = ε − x0``. Integer training timestep ``t`` maps to ``σ = schedule.table[t]`` (the
scheduler's shifted sigmas, ascending in t), and the transformer's timestep input is ``σ · T``, exactly
as diffusers' SD3 training scripts feed it.

Text conditioning comes from the pipeline's own ``encode_prompt`` (CLIP-L + CLIP-G hidden states
concatenated, padded to the T5 width, then T5 tokens; T5 may be absent, the pipeline then uses zeros),
so what the cache stores is exactly what inference feeds the transformer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prefopt_core.models.base import TORCH_DTYPES, dir_fingerprint, read_model_index
from prefopt_core.storage import local_path
from prefopt_core.timesteps import NoiseSchedule

logger = logging.getLogger(__name__)


class SD3Adapter:
    family: ClassVar[str] = "sd3"
    denoiser_subfolder: ClassVar[str] = "transformer"
    encoder_subfolders: ClassVar[list[str]] = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"]

    def __init__(
        self,
        pretrained: str | Path,
        *,
        dtype: str = "fp32",
        device: str | torch.device = "cpu",
        max_sequence_length: int = 256,
        prediction_type: str | None = None,
    ) -> None:
        if prediction_type is not None:
            raise ValueError("sd3 is flow matching; prediction_type does not apply")
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.pretrained = Path(pretrained)
        self.model_index = read_model_index(self.pretrained)
        self.dtype = TORCH_DTYPES[dtype]
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            self.pretrained, subfolder="scheduler"
        )
        self.schedule = NoiseSchedule.from_flow_scheduler(self.scheduler)
        self._encoder_pipe = None

    # ------------------------------------------------------------------ cache stage
    def _encoders(self):
        """The pipeline without its transformer: VAE + text encoders, frozen and in eval mode."""
        if self._encoder_pipe is None:
            from diffusers import StableDiffusion3Pipeline

            extra: dict[str, Any] = {}
            if self.model_index.get("text_encoder_3", [None])[0] is None:
                extra.update(text_encoder_3=None, tokenizer_3=None)
            pipe = StableDiffusion3Pipeline.from_pretrained(
                self.pretrained, transformer=None, dtype=self.dtype, **extra
            )
            for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(pipe, name, None)
                if module is not None:
                    module.requires_grad_(False).eval()
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self._encoder_pipe = pipe
        return self._encoder_pipe

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> dict[str, Tensor]:
        """-> ``prompt_embeds (N, 77 + L_t5, D)`` and ``pooled_prompt_embeds (N, P)``."""
        pipe = self._encoders()
        if pipe.text_encoder_3 is None and pipe.transformer is None:
            # the pipeline reads the zero-T5 width from the transformer config; give it the number
            pipe.transformer = _ConfigOnly(self._transformer_config())
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(captions),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> ``(N, C, H/f, W/f)``: ``(mean(q(z|x)) − shift) · scale``.

        The posterior *mean* is cached (deterministic, reproducible caches); the reference scripts draw
        one posterior sample per step instead, a difference far below the diffusion noise.
        """
        vae = self._encoders().vae
        pixels = pixels.to(self.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean
        shift = vae.config.shift_factor or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float().cpu()

    def side_conditioning(
        self, original_size: Tensor, crop_top_left: Tensor, target_size: int
    ) -> dict[str, Tensor]:
        return {}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "pretrained": str(self.pretrained),
            "encoders": dir_fingerprint(
                self.pretrained, [*self.encoder_subfolders, "tokenizer", "tokenizer_2"]
            ),
            "max_sequence_length": self.max_sequence_length,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ------------------------------------------------------------------ training
    def _transformer_config(self) -> dict[str, Any]:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.load_config(self.pretrained, subfolder="transformer")

    def load_denoiser(self, path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
        from diffusers import SD3Transformer2DModel

        # disable_mmap: weights in memory of their own, not views of a mapped file. DeepSpeed ZeRO copies
        # them into its flat buffers, and the one small tensor it leaves in place (the pos_embed buffer)
        # would keep the whole mapping, every page of which that copy touched, resident next to the copies
        if path is None:
            model = SD3Transformer2DModel.from_pretrained(
                self.pretrained, subfolder="transformer", dtype=dtype, disable_mmap=True
            )
        else:
            model = SD3Transformer2DModel.from_pretrained(local_path(path), dtype=dtype, disable_mmap=True)
        return model

    def sigmas(self, t: Tensor) -> Tensor:
        """``(N,)`` integer timesteps -> ``(N,)`` σ in (0, 1]."""
        return self.schedule.table.to(t.device)[t].float()

    def noisy_latents(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        sigma = self.sigmas(t).view(-1, 1, 1, 1).to(x0.dtype)
        return (1.0 - sigma) * x0 + sigma * noise  # (Eq. 2 of Esser et al.)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def predict(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        timestep = self.sigmas(t) * self.schedule.num_train_timesteps  # (N,) the transformer's scale
        dtype = next(denoiser.parameters()).dtype
        return denoiser(
            hidden_states=x_t.to(dtype),
            timestep=timestep.to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def pipeline(self, denoiser: nn.Module | None = None, dtype: torch.dtype = torch.float32):
        from diffusers import StableDiffusion3Pipeline

        extra: dict[str, Any] = {}
        if self.model_index.get("text_encoder_3", [None])[0] is None:
            extra.update(text_encoder_3=None, tokenizer_3=None)
        if denoiser is not None:
            extra["transformer"] = denoiser
        pipe = StableDiffusion3Pipeline.from_pretrained(self.pretrained, dtype=dtype, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe


class _ConfigOnly(nn.Module):
    """Stand-in that exposes a transformer's config (the pipeline reads ``joint_attention_dim``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(**config)
