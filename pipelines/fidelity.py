"""Does a toy image show what its prompt names? The colour and shape checks behind the fidelity scorers.

- colour: the image's dominant fill colour (median RGB of the saturated foreground pixels) is nearest, in
  chromaticity, to the colour the prompt names (:func:`pipelines.toy_prompts.prompt_color`);
- shape: :func:`pipelines.shapes.classify_shape` of the image equals the shape the prompt names
  (:func:`pipelines.toy_prompts.prompt_shape`); a ``"none"`` silhouette matches no prompt.

A prompt that names no toy colour (shape) is a ValueError naming the valid ones: the check is undefined there,
and a silent 0 would read as a model failure. ``pipelines.rewards`` exposes both as the ``color_accuracy`` and
``shape_accuracy`` scorers (1.0 / 0.0 per image).

    >>> import numpy as np
    >>> from pipelines.toy_world import TOY_COLORS, draw_toy_image
    >>> im = draw_toy_image("square", TOY_COLORS["red"], False, 32, np.random.default_rng(0))
    >>> color_hits([im], ["a red square"]).tolist(), shape_hits([im], ["a blue square"]).tolist()
    ([True], [True])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipelines.scoring import check_inputs
from pipelines.shapes import FG_DISTANCE, as_rgb_array, background_color, classify_shape
from pipelines.toy_prompts import prompt_color, prompt_shape
from pipelines.toy_world import TOY_COLORS

#: Fill colours have ``max - min >= 130``; the outline, the light background and their blends stay below 35.
MIN_CHROMA = 50.0


def dominant_color(image: Image.Image) -> tuple[float, float, float] | None:
    """Median RGB of the fill pixels of one image; None if there are none.

    Background = per-channel median of the 1-px border; foreground = pixels with some channel more than
    ``FG_DISTANCE`` (40) away from it; fill = foreground pixels whose chroma ``max - min`` is >= 50 (the
    near-black outline, the light background and their anti-aliased blends are grey; fill/outline blends keep
    the fill's hue).
    """
    x = as_rgb_array(image)  # (H, W, 3)
    chroma = x.max(axis=-1) - x.min(axis=-1)  # (H, W)
    fill = (np.abs(x - background_color(x)).max(axis=-1) > FG_DISTANCE) & (chroma >= MIN_CHROMA)  # (H, W)
    if not fill.any():
        return None
    r, g, b = np.median(x[fill], axis=0)
    return float(r), float(g), float(b)


def nearest_color_name(rgb: tuple[float, float, float] | None) -> str | None:
    """Name of the ``TOY_COLORS`` entry nearest to ``rgb`` in chromaticity; None passes through.

    Colours are compared after dividing by their brightest channel (``rgb / max(rgb)``), so a fill darkened
    by blending with the outline keeps its name: orange (245, 130, 30) -> (1, .53, .12) stays orange at
    half brightness, where plain RGB distance would call it red.
    """
    if rgb is None:
        return None
    names = list(TOY_COLORS)
    table = np.asarray([TOY_COLORS[n] for n in names], dtype=np.float32)  # (K, 3)
    table = table / table.max(axis=1, keepdims=True)
    x = np.asarray(rgb, dtype=np.float32)
    x = x / max(float(x.max()), 1.0)
    return names[int(np.argmin(((table - x) ** 2).sum(axis=1)))]


def color_hits(images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
    """(N,) bool: image i's dominant fill colour is the colour prompt i names (ValueError if it names none)."""
    check_inputs(images, prompts)
    wanted = [prompt_color(p) for p in prompts]  # first, so a bad prompt fails before any image work
    return np.array(
        [nearest_color_name(dominant_color(im)) == w for im, w in zip(images, wanted)], dtype=bool
    )


def shape_hits(images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
    """(N,) bool: image i's silhouette is the shape prompt i names (ValueError if it names none)."""
    check_inputs(images, prompts)
    wanted = [prompt_shape(p) for p in prompts]
    return np.array([classify_shape(im) == w for im, w in zip(images, wanted)], dtype=bool)


def color_accuracy(images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Fraction of images whose dominant fill colour is the colour named in their prompt."""
    if not images:
        raise ValueError("color_accuracy needs at least one image")
    return float(color_hits(images, prompts).mean())


def shape_accuracy(images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Fraction of images whose silhouette is classified as the shape named in their prompt."""
    if not images:
        raise ValueError("shape_accuracy needs at least one image")
    return float(shape_hits(images, prompts).mean())
