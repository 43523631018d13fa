"""The end-of-run sample grid: base vs trained denoiser on a few training captions, same seed."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from prefopt_core.config import RunConfig

logger = logging.getLogger(__name__)


def write_sample_grid(
    cfg: RunConfig, adapter, prompts: list[str], exported: Path, path: Path, *, device: torch.device
) -> Path:
    """One row per model (``base`` = ``model.init_denoiser`` or the pipeline's own, ``trained`` = the
    exported denoiser), one column per prompt, seed ``run.seed``, ``train.sample_steps`` steps; PNG at ``path``."""
    from pipelines.evaluation import generate_images, image_grid

    kwargs = {"max_sequence_length": cfg.model.max_sequence_length} if cfg.model.family == "sd3" else {}
    rows = {}
    for name, denoiser_dir in (("base", cfg.model.init_denoiser), ("trained", exported)):
        denoiser = adapter.load_denoiser(denoiser_dir, dtype=torch.float32).to(device)
        pipe = adapter.pipeline(denoiser).to(device)
        rows[name] = generate_images(
            pipe,
            prompts,
            [cfg.run.seed],
            resolution=cfg.model.resolution,
            num_inference_steps=cfg.train.sample_steps,
            call_kwargs=kwargs,
        )[0]
        del pipe, denoiser
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, prompts).save(path)
    logger.info("sample grid written to %s", path)
    return path
