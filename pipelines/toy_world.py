"""A synthetic image world for tests and the demo: one coloured shape on a plain light background.

The world has a single style attribute, the *outline*: an outlined ("cartoon") image draws a thick near-black
ring (about ``size / 10`` px: 4 px at 32, 7 px at 64) around the shape; a plain image draws the same silhouette
filled with its colour only. ``pipelines.rewards.OutlineStyleScorer`` detects that style.

Rules of the world (the detector relies on them; ``draw_toy_image`` enforces the colour rules loudly):

- background: one light colour per image, every channel in ``[210, 245]``, plus pixel noise (std 1.5);
- shape: circle, square or triangle (squares and triangles randomly rotated, or upright where asked), circumradius
  ``U(0.24, 0.36) * size``, centre jittered so the shape keeps at least ``max(2, size // 16)`` px from the border;
- fill colour: ``max(color) >= 170`` (never dark, even after JPEG chroma subsampling: the outline is the only
  dark element) and ``min(color) <= 150`` (some channel differs clearly from the light background);
- outline: channels drawn from ``[0, 30]``, width ``outline_width(size) = max(2, ceil(size / 10))`` px, measured
  inwards from the silhouette, so outlined and plain images of the same scene share the same silhouette.

Shapes are rasterised at 4x and box-filtered down, which gives anti-aliased edges.

Run ``python -m pipelines.toy_world OUT_DIR`` to write a small contact sheet of examples.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

Shape = Literal["circle", "square", "triangle"]
SHAPES: tuple[str, ...] = get_args(Shape)

# Named fill colours; each satisfies the fill-colour rules above.
TOY_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "orange": (245, 130, 30),
    "purple": (140, 60, 190),
    "cyan": (30, 190, 200),
    "pink": (235, 100, 170),
}

#: ``_polygon`` angles of the upright poses: a vertex at 45° gives an axis-aligned square, one at -90° (image y
#: points down) a triangle pointing up.
UPRIGHT_ANGLE: dict[str, float] = {"circle": 0.0, "square": math.pi / 4, "triangle": -math.pi / 2}
_SUPERSAMPLE = 4
_BG_RANGE = (210, 245)  # inclusive, per channel
_OUTLINE_MAX = 30  # outline channels are drawn from [0, _OUTLINE_MAX]
_NOISE_STD = 1.5
MIN_FILL_MAX_CHANNEL = 170
MAX_FILL_MIN_CHANNEL = 150


def outline_width(size: int) -> int:
    """Outline thickness in px for an image of side ``size``: ``max(2, ceil(size / 10))`` (4 at 32, 7 at 64)."""
    return max(2, math.ceil(size / 10))


def check_fill_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Validate a fill colour against the world's rules; return it as a tuple of 3 ints in [0, 255]."""
    if len(color) != 3 or any(not 0 <= int(c) <= 255 for c in color):
        raise ValueError(f"color must be 3 ints in [0, 255], got {color!r}")
    rgb = (int(color[0]), int(color[1]), int(color[2]))
    if max(rgb) < MIN_FILL_MAX_CHANNEL:
        raise ValueError(
            f"fill color {rgb} is too dark: the toy world needs max(color) >= {MIN_FILL_MAX_CHANNEL} "
            "because the outline is its only dark element"
        )
    if min(rgb) > MAX_FILL_MIN_CHANNEL:
        raise ValueError(
            f"fill color {rgb} is too close to the light background: the toy world needs "
            f"min(color) <= {MAX_FILL_MIN_CHANNEL}"
        )
    return rgb


def _polygon(center: tuple[float, float], radius: float, n: int, angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular ``n``-gon with circumradius ``radius`` rotated by ``angle`` radians."""
    cx, cy = center
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / n),
            cy + radius * math.sin(angle + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: Shape,
    center: tuple[float, float],
    radius: float,
    angle: float,
    fill: tuple[int, int, int],
) -> None:
    """Fill ``shape`` with circumradius ``radius`` (pixels of the canvas ``draw`` paints on)."""
    if shape == "circle":
        cx, cy = center
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        n = 4 if shape == "square" else 3
        draw.polygon(_polygon(center, radius, n, angle), fill=fill)


def _inset_radius(shape: Shape, radius: float, width: float) -> float:
    """Circumradius of the same shape with every edge moved inwards by ``width``.

    A regular n-gon's inradius is ``R cos(pi / n)``; moving every edge in by ``w`` lowers it by ``w``, so
    ``R' = R - w / cos(pi / n)``. A circle is the limit ``R' = R - w``.
    """
    if shape == "circle":
        return radius - width
    n = 4 if shape == "square" else 3
    return radius - width / math.cos(math.pi / n)


def draw_toy_image(
    shape: Shape,
    color: tuple[int, int, int],
    outline: bool,
    size: int,
    rng: np.random.Generator,
    upright: bool = False,
) -> Image.Image:
    """Draw one toy image: a ``shape`` filled with ``color`` on a light background, optionally outlined.

    Args:
        shape: "circle", "square" or "triangle".
        color: fill colour (RGB); must satisfy the world's rules (see module docstring), else ValueError.
        outline: draw a near-black outline of width ``outline_width(size)`` inside the silhouette.
        size: side of the square RGB image in px (>= 16).
        rng: the only source of randomness (background tint, position, radius, rotation, outline tone, noise).
        upright: draw squares axis-aligned and triangles pointing up instead of rotated (the rotation is
            still drawn from ``rng``, so the other draws of the same ``rng`` are the same either way).

    Returns:
        PIL RGB image of shape (size, size).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 px, got {size}")
    fill = check_fill_color(color)

    bg = tuple(int(c) for c in rng.integers(_BG_RANGE[0], _BG_RANGE[1] + 1, size=3))
    radius = float(rng.uniform(0.24, 0.36)) * size
    margin = max(2, size // 16)
    slack = max(0.0, size / 2 - radius - margin)
    center = (size / 2 + float(rng.uniform(-slack, slack)), size / 2 + float(rng.uniform(-slack, slack)))
    angle = float(rng.uniform(0, 2 * math.pi))
    if upright:
        angle = UPRIGHT_ANGLE[shape]
    dark = tuple(int(c) for c in rng.integers(0, _OUTLINE_MAX + 1, size=3))

    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), bg)
    draw = ImageDraw.Draw(canvas)
    big_center, big_radius = (center[0] * s, center[1] * s), radius * s
    if outline:
        _draw_shape(draw, shape, big_center, big_radius, angle, dark)
        inner = _inset_radius(shape, big_radius, outline_width(size) * s)
        if inner > 0:
            _draw_shape(draw, shape, big_center, inner, angle, fill)
    else:
        _draw_shape(draw, shape, big_center, big_radius, angle, fill)
    small = canvas.resize((size, size), Image.Resampling.BOX)  # (size, size) anti-aliased

    pixels = np.asarray(small, dtype=np.float32) + rng.normal(0.0, _NOISE_STD, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def plain_prompt(color: str, shape: str) -> str:
    """The world's content-only caption of a scene, e.g. ``"a red circle"`` (the style is not named)."""
    return f"a {color} {shape}"


@dataclass(frozen=True)
class ToyScene:
    """One sampled toy image with the attributes that produced it."""

    image: Image.Image
    shape: str
    color_name: str
    outline: bool

    @property
    def caption(self) -> str:
        """Content-only caption, e.g. "a red circle" (the style is not named: it is what a model learns)."""
        return plain_prompt(self.color_name, self.shape)


def sample_toy_scene(rng: np.random.Generator, size: int, outline: bool) -> ToyScene:
    """Draw a scene with a uniformly chosen shape and named colour from ``TOY_COLORS``."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    names = list(TOY_COLORS)
    color_name = names[int(rng.integers(len(names)))]
    image = draw_toy_image(shape, TOY_COLORS[color_name], outline, size, rng)  # type: ignore[arg-type]
    return ToyScene(image=image, shape=shape, color_name=color_name, outline=outline)


def _contact_sheet(out_dir: Path, size: int = 64, n: int = 8, seed: int = 0) -> Path:
    """Write a 2-row sheet (plain on top, outlined below) of ``n`` columns; return its path."""
    rng = np.random.default_rng(seed)
    sheet = Image.new("RGB", (n * size, 2 * size))
    for row, outline in enumerate((False, True)):
        for col in range(n):
            sheet.paste(sample_toy_scene(rng, size, outline).image, (col * size, row * size))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "toy_world.png"
    sheet.save(path)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logger.info("wrote %s", _contact_sheet(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
