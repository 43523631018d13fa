"""Tests for the fidelity checks (``pipelines.fidelity``) and their scorers ``color_accuracy`` / ``shape_accuracy``
(``pipelines.rewards``), on drawn toy images with hand-derived values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.fidelity import color_accuracy, shape_accuracy
from pipelines.rewards import ColorAccuracyScorer, ShapeAccuracyScorer, build_scorer
from pipelines.scoring import Scorer
from pipelines.toy_prompts import prompt_shape
from pipelines.toy_world import TOY_COLORS, draw_toy_image


def _drawn(shape: str, color: str, outline: bool = False, seed: int = 0) -> Image.Image:
    return draw_toy_image(shape, TOY_COLORS[color], outline, 32, np.random.default_rng(seed))  # type: ignore[arg-type]


RED_SQUARE = _drawn("square", "red")
BLUE_CIRCLE = _drawn("circle", "blue", outline=True, seed=1)
BLANK = Image.new("RGB", (32, 32), (230, 230, 230))


def test_color_scorer_right_colour_scores_one_wrong_zero() -> None:
    """A red square and an outlined blue circle: prompts naming their colour -> 1, another colour -> 0; the
    shape named does not matter; a blank image has no fill colour -> 0 for any prompt."""
    images = [RED_SQUARE, RED_SQUARE, BLUE_CIRCLE, BLUE_CIRCLE, BLANK]
    prompts = [
        "a red square",
        "a green square",
        "a blue triangle",
        "disney style. a red circle",
        "a red circle",
    ]
    got = ColorAccuracyScorer().score(images, prompts)
    assert got.dtype == torch.float32
    assert got.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_shape_scorer_right_shape_scores_one_wrong_zero() -> None:
    """Same images: the prompt's shape -> 1, another shape -> 0, whatever the colour named; a blank image is
    ``"none"``, which matches no prompt -> 0."""
    images = [RED_SQUARE, RED_SQUARE, BLUE_CIRCLE, BLUE_CIRCLE, BLANK]
    prompts = [
        "a blue square",
        "a red circle",
        "a blue circle on a light background",
        "a blue triangle",
        "a red circle",
    ]
    assert ShapeAccuracyScorer().score(images, prompts).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_accuracies_are_means_of_the_hits() -> None:
    """Four prompts for two images, two of them right for colour and one right for shape: 2/4 and 1/4."""
    images = [RED_SQUARE, RED_SQUARE, BLUE_CIRCLE, BLUE_CIRCLE]
    prompts = ["a red circle", "a pink square", "a blue triangle", "a green triangle"]
    assert color_accuracy(images, prompts) == 0.5
    assert shape_accuracy(images, prompts) == 0.25


def test_a_prompt_naming_no_colour_or_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"no toy colour in prompt 'a square'; colours: red, green"):
        ColorAccuracyScorer().score([RED_SQUARE], ["a square"])
    with pytest.raises(
        ValueError, match=r"no toy shape in prompt 'a red thing'; shapes: circle, square, triangle"
    ):
        ShapeAccuracyScorer().score([RED_SQUARE], ["a red thing"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        ShapeAccuracyScorer().score([RED_SQUARE], ["a red square", "a red circle"])
    assert prompt_shape("Disney style. A red Circle.") == "circle"  # case and punctuation do not matter


def test_fidelity_scorers_follow_the_scorer_contract() -> None:
    """Built by name like every scorer; (N,) float32; N = 0 works."""
    for name in ("color_accuracy", "shape_accuracy"):
        scorer = build_scorer(name)
        assert isinstance(scorer, Scorer) and scorer.name == name
        assert scorer.score([], []).shape == (0,)
