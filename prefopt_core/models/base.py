"""The small interface every model family implements, the family names, and helpers shared by the families.

The adapters are registered by name in :mod:`prefopt_core.models.registry` (which imports the families;
this module imports none of them).

An adapter owns what differs between families: how prompts and images are encoded into the cache,
how a clean latent becomes a noisy input and a regression target, and how the denoiser is called.
Everything else (losses, reference handling, the trainer) is family-agnostic and talks to this
interface only.

Batch convention: a preference batch holds B pairs; the denoiser sees ``2B`` rows ``[w_1..w_B, l_1..l_B]``
and **w and l of a pair share noise and timestep**. Timesteps are integers ``t in [0, T)`` with larger
``t`` noisier, for every family (see :mod:`prefopt_core.timesteps`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch
from torch import Tensor, nn

from prefopt_core.timesteps import NoiseSchedule

#: The model families prefopt trains (one adapter each in :mod:`prefopt_core.models.registry`).
Family = Literal["sd3", "sdxl", "sd15"]
FAMILIES: tuple[str, ...] = get_args(Family)

Dtype = Literal["fp32", "bf16", "fp16"]
TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelAdapter(Protocol):
    """What the cache stage, the trainer and the samplers need from a model family."""

    family: ClassVar[str]
    #: Sub-folder of the pipeline that holds the trained network ("transformer" or "unet").
    denoiser_subfolder: ClassVar[str]
    schedule: NoiseSchedule
    pretrained: Path

    # -- cache stage (frozen encoders; loaded lazily) --
    def encode_prompts(self, captions: list[str]) -> dict[str, Tensor]:
        """Per-caption conditioning tensors, each with leading dim ``N = len(captions)``."""

    def encode_images(self, pixels: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> scaled latents ``(N, C, h, w)`` (the denoiser's input space)."""

    def side_conditioning(
        self, original_size: Tensor, crop_top_left: Tensor, target_size: int
    ) -> dict[str, Tensor]:
        """Per-image conditioning (SDXL micro-conditioning); ``{}`` for families without it."""

    # -- training --
    def load_denoiser(
        self, path: str | Path | None = None, dtype: torch.dtype = torch.float32
    ) -> nn.Module: ...

    def noisy_latents(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``(N, C, h, w)`` clean latents + noise at integer timesteps ``t (N,)`` -> model input."""

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Regression target at ``t``: ε, v or the flow velocity ε − x0."""

    def predict(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Denoiser output ``(N, C, h, w)`` for ``2B``-row conditioning ``cond``."""

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the frozen encoders (a cache built with other encoders must be refused)."""

    def pipeline(self, denoiser: nn.Module | None = None, dtype: torch.dtype = torch.float32):
        """A diffusers pipeline for generation, optionally with a replaced denoiser."""


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``(N, C, h, w)`` x2 -> ``(N,)``: mean over all non-batch dims of the squared error, in fp32."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def dir_fingerprint(path: Path, subfolders: list[str]) -> dict[str, str]:
    """Short content hashes of the config + weight files of ``subfolders`` of a pipeline directory.

    Weight files are hashed by name, size and the first/last MiB so that multi-GB checkpoints are
    fingerprinted in milliseconds; configs are hashed whole.
    """
    out: dict[str, str] = {}
    for sub in subfolders:
        folder = path / sub
        if not folder.exists():
            out[sub] = "absent"
            continue
        h = hashlib.sha1()
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f.relative_to(folder).as_posix().encode())
            size = f.stat().st_size
            h.update(str(size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
        out[sub] = h.hexdigest()[:16]
    return out


def read_model_index(path: Path) -> dict[str, Any]:
    index = path / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline directory (no model_index.json); pass a directory written "
            "by save_pretrained, or model.pretrained=tiny for the offline tiny model"
        )
    return json.loads(index.read_text())
