"""The toy world's upright pose (``draw_toy_image(upright=True)``): what it draws and what it leaves alone."""

from __future__ import annotations

import numpy as np

from pipelines.shapes import silhouette
from pipelines.toy_world import TOY_COLORS, draw_toy_image


def _mask(shape: str, upright: bool, seed: int = 3) -> np.ndarray:
    image = draw_toy_image(shape, TOY_COLORS["red"], False, 64, np.random.default_rng(seed), upright)
    return silhouette(image)


def test_upright_square_fills_its_bounding_box():
    """An axis-aligned square fills its bounding box (fill ratio near 1, anti-aliased edges aside); rotated by
    a random angle it fills between 1/2 (at 45°) and 1, and seed 3 draws one below 0.9."""

    def fill(mask):
        ys, xs = np.nonzero(mask)
        return mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))

    assert fill(_mask("square", True)) > 0.95
    assert fill(_mask("square", False)) < 0.9


def test_upright_triangle_points_up():
    """Pointing up: the top quarter of the silhouette's rows is narrower than the bottom quarter."""
    mask = _mask("triangle", True)
    rows = mask.sum(axis=1)[mask.any(axis=1)]
    quarter = len(rows) // 4
    assert rows[:quarter].mean() < 0.5 * rows[-quarter:].mean()


def test_upright_leaves_the_other_draws_alone():
    """A circle has no pose, and the angle is still drawn from the rng: the same image either way."""
    assert np.array_equal(_mask("circle", True), _mask("circle", False))
    a = draw_toy_image("circle", TOY_COLORS["red"], True, 32, np.random.default_rng(0), upright=True)
    b = draw_toy_image("circle", TOY_COLORS["red"], True, 32, np.random.default_rng(0))
    assert np.array_equal(np.asarray(a), np.asarray(b))
