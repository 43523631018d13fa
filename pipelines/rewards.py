"""Reward / evaluation scorers behind one interface: ``score(images, prompts) -> (N,) float32, higher = better``.

Scorers (``build_scorer`` names):

- ``clip``: CLIP score ``scale * cos(image_emb, text_emb)`` (scale 100 as torchmetrics' ``CLIPScore``).
- ``pickscore``: PickScore (Kirstain et al. 2023, https://arxiv.org/abs/2305.01569),
  ``logit_scale.exp() * cos(image_emb, text_emb)`` with the fine-tuned CLIP-H ``yuvalkirstain/PickScore_v1``
  and the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
- ``aesthetic``: LAION "improved aesthetic predictor" (github.com/christophschuhmann/improved-aesthetic-predictor):
  L2-normalised CLIP image embedding -> ``AestheticHead``. Ignores prompts.
- ``outline_style``: a deterministic, model-free detector of the toy world's "cartoon" style (a thick dark outline
  around a shape on a light background; see ``pipelines.toy_world``). Ignores prompts.
- ``brightness``: mean luma in [0, 1]. Ignores prompts.
- ``color_accuracy`` / ``shape_accuracy``: fidelity of a toy-world sample to its prompt, 1.0 if the image's
  dominant fill colour / silhouette class is the colour / shape the prompt names, else 0.0
  (:mod:`pipelines.fidelity`); a prompt naming no toy colour / shape is a ValueError. Their mean over a set of
  samples is the colour / shape accuracy.

The CLIP-based scorers live in :mod:`pipelines.clip_scorers` (models load only from local directories; nothing
is downloaded), the scorer interface in :mod:`pipelines.scoring`; this module owns the registry. It never imports
ray or mlflow, and imports transformers only when a CLIP-based scorer is built.

Example::

    from pipelines.clip_scorers import make_tiny_clip
    from pipelines.rewards import build_scorer
    clip_dir = make_tiny_clip("/tmp/tiny_clip")            # random tiny CLIP for tests
    scorer = build_scorer({"name": "clip", "model_dir": str(clip_dir)})
    scores = scorer.score(images, prompts)                  # (N,) float32
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image

from pipelines.clip_scorers import AestheticScorer, ClipScorer, PickScoreScorer
from pipelines.fidelity import color_hits, shape_hits
from pipelines.scoring import Scorer, check_inputs
from pipelines.shapes import FG_DISTANCE, background_color
from pipelines.toy_world import outline_width

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------


def _rgb_array(img: Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) float32 array in [0, 255]."""
    return np.asarray(img.convert("RGB"), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Model-free scorers
# ----------------------------------------------------------------------------------------------------------------

DARK_LO, DARK_HI = 60.0, 110.0  # darkness ramp on V = max(R, G, B): 1 at V <= 60, 0 at V >= 110


def darkness(v: np.ndarray | float) -> np.ndarray:
    """Soft darkness of a value ``v = max(R, G, B)``: ``clip((110 - v) / 50, 0, 1)``.

    1 for v <= 60 (every channel <= 60: near-black), 0.5 at v = 85, 0 for v >= 110.
    """
    return np.clip((DARK_HI - np.asarray(v, dtype=np.float32)) / (DARK_HI - DARK_LO), 0.0, 1.0)


def _min_filter(a: np.ndarray, r: int, pad: float | bool) -> np.ndarray:
    """Minimum over the (2r+1) x (2r+1) square around each pixel of a (H, W) array; outside pixels = ``pad``.

    A square window is separable: take the min over 2r+1 row shifts, then over 2r+1 column shifts.
    """
    h, w = a.shape
    p = np.pad(a, r, mode="constant", constant_values=pad)  # (H + 2r, W + 2r)
    rows = p[:h, :].copy()
    for d in range(1, 2 * r + 1):
        np.minimum(rows, p[d : d + h, :], out=rows)  # (H, W + 2r)
    out = rows[:, :w].copy()
    for d in range(1, 2 * r + 1):
        np.minimum(out, rows[:, d : d + w], out=out)  # (H, W)
    return out


def outline_style_score(x: np.ndarray) -> float:
    """Outline-style score in [0, 1] of one (H, W, 3) RGB array (uint8 or float in [0, 255]).

    Definition (s = min(H, W); V = max(R, G, B) per pixel; ``darkness`` as above):

    1. background colour ``bg`` = per-channel median of the 1-px image border;
    2. foreground ``F`` = pixels whose max channel distance to ``bg`` exceeds 40;
    3. boundary ``B`` = pixels of F with a 3x3 neighbour outside F (outside the image counts as outside F);
    4. ring coverage ``c`` = mean over B of ``darkness(min of V over the (2r+1)^2 square)``, r = max(1, round(s/20))
       (is there a near-black pixel right inside the silhouette?); 0 if B is empty;
    5. interior darkness ``d`` = mean of ``darkness(V)`` over the pixels of F more than ``k = outline_width(s) + 2``
       px (Chebyshev) from outside F, i.e. the fill region with a 2-px margin for blur; 0 if there are none;
    6. ``score = c * (1 - d) * (1 - darkness(max(bg)))``.

    An outlined toy image scores ~1 (the silhouette is bordered by the dark ring, the fill is not dark, the
    background is light); a plain one scores 0 (nothing dark anywhere). Step 5 rejects a dark blob without a fill,
    step 6 a dark image.
    Hand check: a 32x32 background of 240 with a 16x16 square of V=0 (rows/cols 8..23) filled with
    (200, 50, 50) from 12..19: B is the square's outer ring, each of its pixels is 0 -> c = 1; k = 4 + 2 = 6, the
    interior is rows/cols 14..17 inside the red fill -> d = 0; bg darkness 0 -> score = 1. Without the ring
    (whole square red): min V near B is 200 -> c = 0 -> score = 0.
    """
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {x.shape}")
    x = x.astype(np.float32)
    s = min(x.shape[:2])
    if s < 8:
        raise ValueError(f"image too small for the outline detector: {x.shape[:2]} (need >= 8 px)")
    v = x.max(axis=-1)  # (H, W)
    bg = background_color(x)  # (3,)
    fg = np.abs(x - bg).max(axis=-1) > FG_DISTANCE  # (H, W)
    boundary = fg & ~_min_filter(fg, 1, False)
    r = max(1, round(s / 20))
    coverage = float(darkness(_min_filter(v, r, 255.0))[boundary].mean()) if boundary.any() else 0.0
    interior = _min_filter(fg, outline_width(s) + 2, False)
    interior_dark = float(darkness(v[interior]).mean()) if interior.any() else 0.0
    return coverage * (1.0 - interior_dark) * (1.0 - float(darkness(bg.max())))


class OutlineStyleScorer:
    """Deterministic detector of the toy world's outline ("cartoon") style; see ``outline_style_score``.

    ``score`` is continuous in [0, 1]; ``detect`` is ``score >= threshold`` (default 0.5). On 200 + 200 random toy
    images per setting (32 and 64 px; clean, JPEG q90, 2x bilinear down+up) accuracy is 1.0, with plain images at
    0.00 and outlined ones >= 0.85; the same holds at 48, 96 and 128 px and after JPEG + blur combined. Below
    32 px a 2x blur washes the outline out (24 px: clean/JPEG still 1.0, blurred ~0.56). Prompts are ignored.
    """

    name = "outline_style"

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(N,) float32 scores in [0, 1]."""
        check_inputs(images, prompts)
        return torch.tensor([outline_style_score(_rgb_array(im)) for im in images], dtype=torch.float32)

    def detect(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N,) bool: ``score >= threshold``."""
        return self.score(images) >= self.threshold


class BrightnessScorer:
    """Mean Rec. 601 luma ``(0.299 R + 0.587 G + 0.114 B) / 255`` in [0, 1]. Prompts are ignored.

    Hand check: all-white -> 1.0; top half black, bottom half white -> 0.5.
    """

    name = "brightness"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(N,) float32 scores in [0, 1]."""
        check_inputs(images, prompts)
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return torch.tensor(
            [float((_rgb_array(im) @ weights).mean() / 255.0) for im in images], dtype=torch.float32
        )


class ColorAccuracyScorer:
    """1.0 where the image's dominant fill colour is the colour its prompt names, else 0.0
    (:func:`pipelines.fidelity.color_hits`). A prompt naming no toy colour raises ValueError."""

    name = "color_accuracy"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) float32 in {0, 1}."""
        return torch.from_numpy(color_hits(images, prompts).astype(np.float32))


class ShapeAccuracyScorer:
    """1.0 where the image's silhouette is classified as the shape its prompt names, else 0.0
    (:func:`pipelines.fidelity.shape_hits`). A prompt naming no toy shape raises ValueError."""

    name = "shape_accuracy"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) float32 in {0, 1}."""
        return torch.from_numpy(shape_hits(images, prompts).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------

ScorerName = Literal[
    "clip", "pickscore", "aesthetic", "outline_style", "brightness", "color_accuracy", "shape_accuracy"
]
SCORERS: dict[str, type] = {
    "clip": ClipScorer,
    "pickscore": PickScoreScorer,
    "aesthetic": AestheticScorer,
    "outline_style": OutlineStyleScorer,
    "brightness": BrightnessScorer,
    "color_accuracy": ColorAccuracyScorer,
    "shape_accuracy": ShapeAccuracyScorer,
}
assert set(SCORERS) == set(get_args(ScorerName))

_PATH_HINTS = {
    "model_dir": "a local CLIP-style checkpoint directory (config.json, weights, processor files)",
    "clip_dir": "a local CLIP checkpoint directory with its processor (e.g. a copy of openai/clip-vit-large-patch14)",
    "head_path": "the aesthetic MLP state dict (.safetensors or .pth)",
}


def build_scorer(spec: str | dict[str, Any]) -> Scorer:
    """Build a scorer from ``"name"`` or ``{"name": ..., **constructor kwargs}``.

    Example: ``build_scorer({"name": "pickscore", "model_dir": "/m/PickScore_v1", "processor_dir": "/m/CLIP-H"})``.
    Unknown name or key -> ValueError listing the valid ones; a missing or absent path -> FileNotFoundError saying
    which key to pass.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"scorer spec must be a name or a dict with a 'name' key, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid names: {sorted(SCORERS)}")
    cls = SCORERS[name]
    params = {
        k: p
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k != "self"
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)  # object.__init__ has *args, **kwargs
    }
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"scorer {name!r} got unknown keys {unknown}; valid keys: {sorted(params)}")
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in kwargs:
            hint = _PATH_HINTS.get(key, "a value")
            raise FileNotFoundError(
                f"scorer {name!r} needs {key!r}: pass {{'name': {name!r}, {key!r}: <{hint}>}}"
            )
    scorer = cls(**kwargs)
    logger.info("built scorer %s", name)
    return scorer
