"""Tests for the silhouette shape classifier (``pipelines.shapes``): hand-drawn arrays with their expected class,
"none" cases, and accuracy on drawn toy images (clean, JPEG, blurred; 32 and 64 px)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipelines.shapes import SHAPE_CLASSES, classify_shape, largest_component, template_errors
from pipelines.toy_world import SHAPES, sample_toy_scene

BG, RED, DARK = (235, 232, 228), (220, 40, 40), (10, 10, 10)
YY, XX = np.mgrid[:32, :32].astype(np.float64)  # pixel-centre coordinates of a 32 x 32 image


def _paint(mask: np.ndarray, color: tuple[int, int, int] = RED, base: np.ndarray | None = None) -> np.ndarray:
    """``mask`` (32, 32) painted in ``color`` on the light background (or on ``base``): (32, 32, 3) uint8."""
    x = np.empty((32, 32, 3), dtype=np.uint8) if base is None else base.copy()
    if base is None:
        x[:] = BG
    x[mask] = color
    return x


def _triangle_mask(cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Equilateral triangle with circumradius ``radius``: inside all three edges' half-planes."""
    verts = [(cx + radius * math.cos(angle + 2 * math.pi * k / 3), cy + radius * math.sin(angle + 2 * math.pi * k / 3))
             for k in range(3)]  # fmt: skip
    inside = np.ones((32, 32), dtype=bool)
    for (x0, y0), (x1, y1) in zip(verts, verts[1:] + verts[:1]):
        cross = (x1 - x0) * (YY - y0) - (y1 - y0) * (XX - x0)  # same sign for every interior point
        inside &= cross >= 0
    return inside


DISC = (YY - 15.5) ** 2 + (XX - 15.5) ** 2 <= 10.0**2
SQUARE = (np.abs(YY - 15.5) <= 8) & (np.abs(XX - 15.5) <= 8)  # rows/cols 8..23
DIAMOND = np.abs(YY - 16) + np.abs(XX - 16) <= 11  # a square rotated by 45 degrees
TRIANGLE = _triangle_mask(16.0, 17.0, 11.0, -math.pi / 2)  # apex up
TILTED_TRIANGLE = _triangle_mask(15.0, 16.0, 11.0, 0.3)


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (DISC, "circle"),
        (SQUARE, "square"),
        (DIAMOND, "square"),
        (TRIANGLE, "triangle"),
        (TILTED_TRIANGLE, "triangle"),
    ],
    ids=["disc", "square", "rotated-square", "triangle", "tilted-triangle"],
)
def test_hand_drawn_shapes(mask: np.ndarray, expected: str) -> None:
    """A radius-10 disc, a 16 px axis-aligned square, the same square turned 45 degrees (|dx| + |dy| <= 11) and
    equilateral triangles of circumradius 11, painted red without anti-aliasing: each is its own class."""
    assert classify_shape(_paint(mask)) == expected


def test_the_outline_ring_belongs_to_the_silhouette() -> None:
    """An outlined square: a dark 16 px square with a red 8 px square inside (a 4 px ring). The silhouette is the
    outer 16 px square, so the class is square even though the red part alone would be too."""
    x = _paint(SQUARE, DARK)
    inner = (np.abs(YY - 15.5) <= 4) & (np.abs(XX - 15.5) <= 4)
    assert classify_shape(_paint(inner, RED, base=x)) == "square"
    ring_disc = _paint(DISC, DARK)
    assert (
        classify_shape(_paint((YY - 15.5) ** 2 + (XX - 15.5) ** 2 <= 6.0**2, RED, base=ring_disc)) == "circle"
    )


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((32, 32), dtype=bool),  # empty image
        (np.abs(YY - 16) <= 1) & (np.abs(XX - 16) <= 1),  # 9 px dot: under 1 % of 1024 px
        (np.abs(YY - 16) <= 4) & (np.abs(XX - 16) <= 12),  # 9 x 25 bar
        ((np.abs(YY - 16) <= 3) & (np.abs(XX - 16) <= 11))
        | ((np.abs(XX - 16) <= 3) & (np.abs(YY - 16) <= 11)),
        ((YY - 16) / 6) ** 2 + ((XX - 16) / 12) ** 2 <= 1,  # 2:1 ellipse
    ],
    ids=["empty", "dot", "bar", "cross", "ellipse"],
)
def test_what_is_no_shape(mask: np.ndarray) -> None:
    """No foreground, a silhouette under 1 % of the image, or one no template fits within 0.09: ``"none"``.
    Hand values of the best fits: bar 0.41 (square), cross 0.21 (square), 2:1 ellipse 0.26 (square)."""
    assert classify_shape(_paint(mask)) == "none"


def test_the_largest_component_is_the_silhouette() -> None:
    """A disc plus a separate 3 x 3 speck: the speck is dropped, the disc is classified."""
    mask = DISC | ((np.abs(YY - 1.5) <= 1) & (np.abs(XX - 29.5) <= 1))
    assert largest_component(mask).sum() == DISC.sum()
    assert classify_shape(_paint(mask)) == "circle"


def test_template_errors_by_hand() -> None:
    """A constant profile is a perfect circle (error 0); the exact square profile ``r = 1 / cos ψ`` fits the square
    template with error 0 and the circle with ``std / mean`` of ``sec ψ`` on [-π/4, π/4]: 0.107."""
    theta = 2 * np.pi * np.arange(360) / 360
    psi = np.mod(theta + np.pi / 4, np.pi / 2) - np.pi / 4
    square = template_errors(1 / np.cos(psi))
    assert template_errors(np.full(360, 7.0))["circle"] == pytest.approx(0.0, abs=1e-12)
    assert square["square"] == pytest.approx(0.0, abs=1e-9)
    assert square["circle"] == pytest.approx(0.107, abs=0.002)
    assert square["triangle"] > 0.1


def _jpeg75(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "clean": lambda im: im,
    "jpeg75": _jpeg75,
    "blur0.7": lambda im: im.filter(ImageFilter.GaussianBlur(0.7)),
}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_accuracy_on_drawn_toy_images(size: int, variant: str) -> None:
    """300 random toy scenes (half outlined): accuracy >= 0.98 (measured: 1.0 in every setting)."""
    rng = np.random.default_rng(1000 * size + len(variant))
    scenes = [sample_toy_scene(rng, size, outline=bool(i % 2)) for i in range(300)]
    got = [classify_shape(VARIANTS[variant](s.image)) for s in scenes]
    assert set(got) <= set(SHAPE_CLASSES)
    accuracy = float(np.mean([g == s.shape for g, s in zip(got, scenes, strict=True)]))
    assert accuracy >= 0.98, f"{size}px {variant}: accuracy {accuracy:.3f}"
    assert {s.shape for s in scenes} == set(SHAPES)
