"""Paired evaluation of text-to-image models: generate prompts x seeds, score, win rates against a baseline.

The protocol of Rethinking-DPO's evaluation (per-seed win rates against the base model, reported as mean and
std over seeds), with the pieces kept pure (no Ray, no MLflow) so ``ray_jobs.evaluate`` only wires them up:

- :func:`load_prompts`: a text file (one prompt per line) or parquet ``caption`` column, de-duplicated in order;
  default :func:`toy_eval_prompts`.
- :func:`generate_images`: ``images[s][p]`` for seed ``s`` and prompt ``p``. The initial noise of ``(s, p)`` is
  ``randn(1, C, h, w)`` from a CPU generator seeded ``s`` — the noise ``pipe(prompt, generator=
  torch.Generator().manual_seed(s))`` draws for a single prompt — and it is passed explicitly as ``latents``,
  so every model starts from the same noise (paired comparison) regardless of batch size or prompt count.
- :func:`score_grid`: a scorer (``pipelines.rewards``) over ``images[s][p]`` -> ``(S, P)`` scores.
- :func:`win_rates`: model beats baseline on ``(s, p)`` if its score is higher, ties count 0.5; the win rate is
  the mean over all ``(s, p)``; per seed the mean over prompts, with mean and std over seeds.
- :func:`summarize`: means, win rates and (for scorers with ``detect``, i.e. ``outline_style``) the style
  adoption rate = fraction of samples detected.
- :func:`image_grid`: rows = models, columns = prompts, one seed, labelled.

Example::

    images = generate_images(pipe, prompts, seeds=[0, 1], resolution=32, num_inference_steps=20)
    scores = score_grid(build_scorer("outline_style"), images, prompts)          # (2, P)
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines.toy_world import SHAPES, TOY_COLORS

logger = logging.getLogger(__name__)

#: Phrasing of the default evaluation prompts. Training captions are "a {color} {shape}"; the toy world has
#: only 24 scenes, so the held-out set differs in wording, not in content.
TOY_EVAL_TEMPLATE = "a {color} {shape} on a light background"

#: Generated images ``images[s][p]``: one row per seed, one image per prompt.
ImageGrid = list[list[Image.Image]]


# ------------------------------------------------------------------------------------------- prompts
def toy_eval_prompts() -> list[str]:
    """The 24 toy-world scenes as held-out prompts, ordered so the first few vary both shape and colour.

    Prompt ``i`` uses ``SHAPES[i % 3]`` and the ``i % 8``-th colour of ``TOY_COLORS``; since 3 and 8 are
    coprime, ``i -> (i % 3, i % 8)`` hits every (shape, colour) pair exactly once for ``i < 24``
    (Chinese remainder theorem). Prompt 0 is "a red circle on a light background", prompt 1 "a green square ...".
    """
    colors = list(TOY_COLORS)
    n = len(SHAPES) * len(colors)
    return [
        TOY_EVAL_TEMPLATE.format(color=colors[i % len(colors)], shape=SHAPES[i % len(SHAPES)])
        for i in range(n)
    ]


def load_prompts(source: str | Path | None, num_prompts: int | None = None) -> list[str]:
    """Prompts from ``source`` (None: :func:`toy_eval_prompts`), de-duplicated in order, the first ``num_prompts``.

    ``source``: a ``.parquet`` file or a directory of parquet files with a ``caption`` column (Pick-a-Pic
    repeats captions; duplicates are dropped), or a text file with one prompt per line (blank lines skipped).
    Asking for more prompts than there are uses them all, with a warning.
    """
    if source is None:
        prompts = toy_eval_prompts()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"eval.prompts={str(source)!r} does not exist: pass a text file (one prompt per line) or a "
                "parquet file/directory with a 'caption' column"
            )
        if path.is_dir() or path.suffix == ".parquet":
            import pyarrow.parquet as pq

            schema_names = pq.read_schema(path).names if path.is_file() else None
            if schema_names is not None and "caption" not in schema_names:
                raise ValueError(f"{path} has no 'caption' column; columns: {schema_names}")
            captions = pq.read_table(path, columns=["caption"]).column("caption").to_pylist()
            prompts = [c.strip() for c in captions if c and c.strip()]
        else:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = list(dict.fromkeys(prompts))  # de-duplicated, first occurrence order
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    if num_prompts is not None:
        if num_prompts > len(prompts):
            logger.warning("asked for %d prompts but %s has %d: using all", num_prompts, source, len(prompts))
        prompts = prompts[:num_prompts]
    return prompts


# ------------------------------------------------------------------------------------------- generation
def _denoiser(pipe) -> torch.nn.Module:
    module = getattr(pipe, "transformer", None)
    if module is None:
        module = getattr(pipe, "unet", None)
    if module is None:
        raise TypeError(f"{type(pipe).__name__} has neither a transformer nor a unet")
    return module


def initial_noise(pipe, resolution: int, seed: int) -> torch.Tensor:
    """``(1, C, resolution / f, resolution / f)`` float32 CPU noise from ``torch.Generator().manual_seed(seed)``.

    ``C`` is the denoiser's input channels and ``f`` the pipeline's VAE scale factor: the shape and draw of
    diffusers' ``prepare_latents`` for one prompt with a CPU generator.
    """
    factor = int(pipe.vae_scale_factor)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE scale factor {factor}")
    channels = int(_denoiser(pipe).config.in_channels)
    shape = (1, channels, resolution // factor, resolution // factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    batch_size: int = 8,
    call_kwargs: Mapping[str, Any] | None = None,
    progress=None,
) -> ImageGrid:
    """``images[s][p]``: ``pipe`` on every prompt for every seed, from the paired noise of :func:`initial_noise`.

    ``call_kwargs`` go to every pipeline call (e.g. ``max_sequence_length`` for SD3). Outputs do not depend on
    ``batch_size`` beyond the float noise of batched matmuls. ``progress`` (a
    :class:`pipelines.progress.Progress`) counts the images as they are made.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts or not seeds:
        raise ValueError("need at least one prompt and one seed")
    out: ImageGrid = []
    for seed in seeds:
        noise = initial_noise(pipe, resolution, seed)  # (1, C, h, w): the same for every prompt of this seed
        row: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            latents = noise.expand(len(batch), *noise.shape[1:]).clone()  # (b, C, h, w)
            result = pipe(
                prompt=batch,
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
                **dict(call_kwargs or {}),
            )
            row.extend(result.images)
            if progress is not None:
                progress.update(len(batch))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- scoring
def score_grid(scorer, images: ImageGrid, prompts: Sequence[str]) -> np.ndarray:
    """``(S, P)`` float64 scores of ``images[s][p]`` against ``prompts[p]`` (one scorer call for all)."""
    flat = [im for row in images for im in row]
    if any(len(row) != len(prompts) for row in images):
        raise ValueError(f"every seed row must hold {len(prompts)} images (one per prompt)")
    scores = scorer.score(flat, [p for _ in images for p in prompts])
    return np.asarray(scores, dtype=np.float64).reshape(len(images), len(prompts))


def detect_grid(scorer, images: ImageGrid) -> np.ndarray | None:
    """``(S, P)`` bool from ``scorer.detect`` (the outline-style detector), or None for scorers without it."""
    detect = getattr(scorer, "detect", None)
    if detect is None:
        return None
    flat = [im for row in images for im in row]
    return np.asarray(detect(flat), dtype=bool).reshape(len(images), len(images[0]))


@dataclass(frozen=True)
class WinRates:
    """Win rates of a model against the baseline on paired samples.

    ``win_rate``: mean over all (seed, prompt) of 1 (model higher), 0.5 (tie), 0 (lower).
    ``per_seed``: for each seed, the same mean over its prompts; ``seed_mean``/``seed_std`` summarise them
    (population std, ddof 0). With equally many prompts per seed ``seed_mean == win_rate``.
    """

    win_rate: float
    per_seed: list[float]
    seed_mean: float
    seed_std: float


def win_matrix(model: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """``(S, P)`` outcomes: 1.0 where ``model > baseline``, 0.5 where equal, 0.0 where lower (exact comparison)."""
    model, baseline = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if model.shape != baseline.shape or model.ndim != 2:
        raise ValueError(f"need two (S, P) arrays of the same shape, got {model.shape} and {baseline.shape}")
    return (model > baseline).astype(np.float64) + 0.5 * (model == baseline)


def win_rates(model: np.ndarray, baseline: np.ndarray) -> WinRates:
    """:class:`WinRates` of ``model`` against ``baseline``, both ``(S, P)`` scores of the same (seed, prompt)."""
    wins = win_matrix(model, baseline)  # (S, P)
    per_seed = wins.mean(axis=1)  # (S,)
    return WinRates(
        win_rate=float(wins.mean()),
        per_seed=[float(x) for x in per_seed],
        seed_mean=float(per_seed.mean()),
        seed_std=float(per_seed.std()),
    )


def summarize(
    scores: Mapping[str, Mapping[str, np.ndarray]],
    baseline: str,
    detections: Mapping[str, Mapping[str, np.ndarray | None]] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {scorer: stats}}`` from ``scores[model][scorer]`` ``(S, P)`` arrays.

    Stats: ``mean`` and ``std`` of the scores; for every model but ``baseline`` also ``win_rate``,
    ``win_rate_per_seed``, ``win_rate_seed_mean``, ``win_rate_seed_std``; where ``detections[model][scorer]``
    is given, ``adoption_rate`` = fraction of samples detected.
    """
    if baseline not in scores:
        raise ValueError(f"baseline {baseline!r} has no scores; models: {sorted(scores)}")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, per_scorer in scores.items():
        out[model] = {}
        for name, values in per_scorer.items():
            stats: dict[str, Any] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
            if model != baseline:
                wr = win_rates(values, scores[baseline][name])
                stats.update(
                    win_rate=wr.win_rate,
                    win_rate_per_seed=wr.per_seed,
                    win_rate_seed_mean=wr.seed_mean,
                    win_rate_seed_std=wr.seed_std,
                )
            detected = (detections or {}).get(model, {}).get(name)
            if detected is not None:
                stats["adoption_rate"] = float(np.mean(detected))
            out[model][name] = stats
    return out


# ------------------------------------------------------------------------------------------- grid
def image_grid(
    rows: Mapping[str, Sequence[Image.Image]],
    prompts: Sequence[str],
    *,
    cell: int = 128,
    label_width: int = 110,
    header_lines: int = 3,
) -> Image.Image:
    """A labelled contact sheet: one row per model (name on the left), one column per prompt (text on top).

    Images are resized to ``cell`` px squares (nearest neighbour, so tiny images stay crisp).
    """
    if any(len(images) != len(prompts) for images in rows.values()):
        raise ValueError(f"every row must hold {len(prompts)} images (one per prompt)")
    font = ImageFont.load_default()
    line_h = 12
    header = header_lines * line_h + 8
    grid = Image.new("RGB", (label_width + cell * len(prompts), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(4, cell // 7)
    for col, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, chars)[:header_lines] or [""]
        for i, line in enumerate(lines):
            draw.text((label_width + col * cell + 4, 4 + i * line_h), line, fill="black", font=font)
    for row, (name, images) in enumerate(rows.items()):
        top = header + row * cell
        for i, line in enumerate(textwrap.wrap(name, max(4, label_width // 7))[: cell // line_h]):
            draw.text((4, top + 4 + i * line_h), line, fill="black", font=font)
        for col, im in enumerate(images):
            tile = im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + col * cell, top))
    return grid


def as_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy arrays and scalars -> plain JSON types (for results files)."""
    if isinstance(obj, WinRates):
        return asdict(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [as_jsonable(v) for v in obj]
    return obj
