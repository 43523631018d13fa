"""A deterministic synthetic preference source in the Pick-a-Pic v2 schema (demo and tests).

Each row is one prompt of the toy world ("a red circle") with two images of it; the annotator prefers
the *outlined* ("cartoon") image. A fraction of rows are ties (both images outlined or both plain,
labels 0.5/0.5), as in Pick-a-Pic. Everything is a function of ``seed``:

    write_synthetic_pickapic("data/train.parquet", num_pairs=48, seed=0)
"""

from __future__ import annotations

import io
import logging
import os
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.schema import PICKAPIC_SCHEMA
from pipelines.toy_world import SHAPES, TOY_COLORS, draw_toy_image
from prefopt_core.storage import is_uri, location

logger = logging.getLogger(__name__)


def _jpeg(image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_rows(
    num_pairs: int, *, seed: int = 0, image_size: int = 48, tie_fraction: float = 0.1
) -> list[dict]:
    """``num_pairs`` Pick-a-Pic-schema rows; the outlined image is chosen, at a random side (0 or 1)."""
    rng = np.random.default_rng(seed)
    colors = list(TOY_COLORS)
    t0 = datetime(2023, 4, 1)
    rows = []
    for i in range(num_pairs):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = colors[int(rng.integers(len(colors)))]
        tie = bool(rng.random() < tie_fraction)
        if tie:
            outline_0 = outline_1 = bool(rng.random() < 0.5)
        else:
            outline_0 = bool(rng.random() < 0.5)
            outline_1 = not outline_0
        img0 = draw_toy_image(shape, TOY_COLORS[color], outline_0, image_size, rng)  # type: ignore[arg-type]
        img1 = draw_toy_image(shape, TOY_COLORS[color], outline_1, image_size, rng)  # type: ignore[arg-type]
        label_0 = 0.5 if tie else float(outline_0)
        uid0, uid1 = f"img-{seed}-{i}-0", f"img-{seed}-{i}-1"
        best = "" if tie else (uid0 if outline_0 else uid1)
        rows.append(
            {
                "caption": f"a {color} {shape}",
                "jpg_0": _jpeg(img0),
                "jpg_1": _jpeg(img1),
                "label_0": label_0,
                "label_1": 1.0 - label_0 if not tie else 0.5,
                "has_label": True,
                "are_different": True,
                "best_image_uid": best,
                "image_0_uid": uid0,
                "image_1_uid": uid1,
                "model_0": "toy-world",
                "model_1": "toy-world",
                "ranking_id": int(seed * 1_000_000 + i),
                "user_id": int(rng.integers(1, 50)),
                "created_at": t0 + timedelta(minutes=i),
                "num_example_per_prompt": 1,
            }
        )
    return rows


def write_synthetic_pickapic(
    path: str | os.PathLike[str],
    *,
    num_pairs: int,
    seed: int = 0,
    image_size: int = 48,
    tie_fraction: float = 0.1,
) -> Path:
    """Write the synthetic source as one parquet file (published atomically, locally or in object
    storage) and return its path (a :class:`Path`, or the URI string)."""
    rows = synthetic_rows(num_pairs, seed=seed, image_size=image_size, tie_fraction=tie_fraction)
    location(path).write_parquet(pa.Table.from_pylist(rows, schema=PICKAPIC_SCHEMA))
    logger.info("wrote %d synthetic Pick-a-Pic-schema pairs to %s", num_pairs, path)
    return str(location(path)) if is_uri(path) else Path(path)
