"""Sampling and measuring the toy base (:mod:`pipelines.toy_base`) and its fine-tunes: the testbed's sampler
settings, seed-major generation, and the base's style rate, colour and shape accuracy.

    from pipelines.toy_sampling import measure_base
    print(measure_base("/tmp/toy_base"))   # held-out prompts x 32 seeds, plain and style prompts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.fidelity import color_accuracy, shape_accuracy
from pipelines.rewards import OutlineStyleScorer
from pipelines.toy_base import ToyBaseConfig
from pipelines.toy_prompts import heldout_prompts, style_prompt


@dataclass(frozen=True)
class SamplerSettings:
    """How the testbed samples the base and its fine-tunes (the T5 window is the base's)."""

    num_inference_steps: int = 20
    # Chosen on the shipped base (``measure_base`` with ``guidance_scale`` overridden; 8 held-out prompts x 32
    # seeds, plain prompts, one sample each, so rates carry a binomial sd of ~0.02): guidance 1.0 (no classifier-free
    # guidance) is the only one that keeps the prior outline rate within the 0.15-0.35 the preference stage
    # needs (0.164; 1.25: 0.125, 1.5: 0.109, 2.5: 0.086), with colour accuracy 0.965 and shape accuracy 0.875
    # (guidance 2.5: 0.988 and 0.969). CFG sharpens colour and shape but suppresses the prior style.
    guidance_scale: float = 1.0
    max_sequence_length: int = ToyBaseConfig.max_sequence_length


EVAL_SETTINGS = SamplerSettings()


def load_base(path: str | Path):
    """``StableDiffusion3Pipeline.from_pretrained(path)`` with the progress bar off."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings = EVAL_SETTINGS,
    batch: int = 64,
) -> tuple[list, list[str]]:
    """Every prompt x every seed (seed-major); returns ``(images, prompts)`` in the same order."""
    jobs = [(p, s) for s in seeds for p in prompts]
    images = []
    size = pipe.vae.config.sample_size
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        out = pipe(
            prompt=[p for p, _ in chunk],
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            max_sequence_length=settings.max_sequence_length,
            height=size,
            width=size,
        )
        images.extend(out.images)
    return images, [p for p, _ in jobs]


def style_rate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = EVAL_SETTINGS.num_inference_steps,
    guidance: float = EVAL_SETTINGS.guidance_scale,
) -> float:
    """Fraction of the ``len(prompts) * len(seeds)`` samples that ``OutlineStyleScorer().detect`` flags."""
    settings = SamplerSettings(steps, guidance, EVAL_SETTINGS.max_sequence_length)
    images, _ = generate(pipe, prompts, seeds, settings)
    return float(OutlineStyleScorer().detect(images).float().mean())


def measure_base(
    path_or_pipe,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = tuple(range(32)),
    settings: SamplerSettings = EVAL_SETTINGS,
    sheet_path: str | Path | None = None,
) -> dict[str, float]:
    """Style rates, colour and shape accuracies of plain and style prompts on ``prompts`` (default: held-out) x
    ``seeds``.

    Returns ``{kind}_style_rate``, ``{kind}_color_acc`` and ``{kind}_shape_acc`` for ``kind`` in plain and style,
    and ``n_per_kind``. The samples of one seed share their initial noise across prompts, so the seed count, not
    the sample count, sets the noise of the rates: use >= 32 seeds. ``sheet_path`` writes a PNG of the first
    8 seeds (rows) x plain then style prompts (columns).
    """
    pipe = load_base(path_or_pipe) if isinstance(path_or_pipe, (str, Path)) else path_or_pipe
    prompts = list(prompts or heldout_prompts())
    detector = OutlineStyleScorer()
    result: dict[str, float] = {}
    shown = []
    for kind, batch_prompts in (("plain", prompts), ("style", [style_prompt(p) for p in prompts])):
        images, used = generate(pipe, batch_prompts, seeds, settings)
        result[f"{kind}_style_rate"] = float(detector.detect(images).float().mean())
        result[f"{kind}_color_acc"] = color_accuracy(images, used)
        result[f"{kind}_shape_acc"] = shape_accuracy(images, used)
        shown.append(images[: 8 * len(prompts)])
    result["n_per_kind"] = float(len(prompts) * len(seeds))
    if sheet_path is not None:
        n = len(prompts)
        rows = [img for r in range(len(shown[0]) // n) for part in shown for img in part[r * n : (r + 1) * n]]
        contact_sheet(rows, 2 * n).save(sheet_path)
    return result


def contact_sheet(images: Sequence, columns: int):
    """Paste equally sized PIL images into a grid with ``columns`` columns; returns the PIL sheet."""
    w, h = images[0].size
    rows = int(np.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet
