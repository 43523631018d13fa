"""Arrow schemas of the data pipeline: the single source of truth for column names and types.

Three tables flow through ``pipelines``:

* ``PICKAPIC_SCHEMA``   -- a raw Pick-a-Pic v2 row as published (one human judgement of two images).
  MaPO-style datasets (pick-style-*, pick-safety) carry only ``PICKAPIC_REQUIRED`` with *int* labels
  (``MAPO_SCHEMA``); readers accept both, and labels of int, float or numeric-string type.
* ``PAIR_SCHEMA``       -- a validated, canonical pair: chosen image first (``jpg_w``), rejected second.
* ``QUARANTINE_SCHEMA`` -- a rejected row, with the reason and the original data so nothing is lost.

Pair identity (``make_pair_id`` / ``make_source_key``) and the per-pair random generator (``pair_rng``)
live here too, because the cache, the trainer and the evaluators must all agree on them.

Run ``python -m pipelines.schema`` to print the schemas.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from prefopt_core.storage import is_uri, location

# ---------------------------------------------------------------------------------------------------------
# Pick-a-Pic input
# ---------------------------------------------------------------------------------------------------------

PICKAPIC_REQUIRED: tuple[str, ...] = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")

PICKAPIC_OPTIONAL: tuple[str, ...] = (
    "has_label",
    "are_different",
    "best_image_uid",
    "image_0_uid",
    "image_1_uid",
    "image_0_url",
    "image_1_url",
    "model_0",
    "model_1",
    "ranking_id",
    "user_id",
    "created_at",
    "num_example_per_prompt",
)

# Types as in the dataset card of yuvalkirstain/pickapic_v2 (created_at is timestamp[ns] there; the hub
# parquet also carries a pandas ``__index_level_0__`` column, which we ignore).
PICKAPIC_SCHEMA = pa.schema(
    [
        pa.field("are_different", pa.bool_()),
        pa.field("best_image_uid", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("created_at", pa.timestamp("ns")),
        pa.field("has_label", pa.bool_()),
        pa.field("image_0_uid", pa.string()),
        pa.field("image_0_url", pa.string()),
        pa.field("image_1_uid", pa.string()),
        pa.field("image_1_url", pa.string()),
        pa.field("jpg_0", pa.binary()),
        pa.field("jpg_1", pa.binary()),
        pa.field("label_0", pa.float64()),
        pa.field("label_1", pa.float64()),
        pa.field("model_0", pa.string()),
        pa.field("model_1", pa.string()),
        pa.field("ranking_id", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("num_example_per_prompt", pa.int64()),
    ]
)

# MaPO-style generated datasets: the five required columns, integer labels (1 = chosen).
MAPO_SCHEMA = pa.schema(
    [
        pa.field("caption", pa.string()),
        pa.field("jpg_0", pa.binary()),
        pa.field("jpg_1", pa.binary()),
        pa.field("label_0", pa.int64()),
        pa.field("label_1", pa.int64()),
    ]
)

# ---------------------------------------------------------------------------------------------------------
# Canonical pairs and quarantine
# ---------------------------------------------------------------------------------------------------------

# No column of a pair is ever null (fields are left nullable=True so that tables built by Ray Data and
# parquet round trips compare equal to this schema).
PAIR_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string()),  # make_pair_id(source_key, row_index)
        pa.field("caption", pa.string()),
        pa.field("jpg_w", pa.binary()),  # chosen ("winner") image bytes, as in the source
        pa.field("jpg_l", pa.binary()),  # rejected ("loser") image bytes
        pa.field("label_w", pa.float64()),  # 1.0, or 0.5 for a kept tie
        pa.field("label_l", pa.float64()),  # 0.0, or 0.5 for a kept tie
        pa.field("is_tie", pa.bool_()),
        pa.field("swapped", pa.bool_()),  # True: jpg_w came from the source's jpg_1
        pa.field("source", pa.string()),  # file path (absolute) or hub id
        pa.field("row_index", pa.int64()),  # row in the source file / split
    ]
)

# Row-check reasons, in the order the checks run (the first failing check names the row). The last two
# are not produced by ``validate_and_canonicalize``'s checks: ``invalid_row`` is the catch-all for an
# unexpected exception on a row, ``nonfinite_latents`` is produced by the encoder stage (latent_cache).
# A missing *column* is not a row reason: it is a hard error (MissingColumnError) before any work.
QUARANTINE_REASONS: tuple[str, ...] = (
    "empty_caption",  # null or whitespace-only caption
    "caption_too_long",  # more than max_caption_chars characters (garbage, not CLIP's 77 tokens)
    "nan_label",  # label_0 or label_1 is NaN
    "bad_label",  # null, non-numeric, infinite, or outside [0, 1]
    "labels_not_sum_to_one",  # |label_0 + label_1 - 1| > 1e-6
    "empty_image",  # null or 0-byte image
    "image_too_large",  # width * height (from the header) over max_image_pixels
    "image_too_small",  # min(width, height) (from the header) under min_image_side
    "undecodable_image",  # unknown format, corrupt header, verify() or decode failure
    "truncated_image",  # decoder ran out of data (e.g. a JPEG cut in half)
    "identical_images",  # same bytes, or same decoded pixels
    "tie",  # label_0 == label_1 == 0.5 under tie_policy="drop"
    "invalid_row",  # any unexpected exception while checking the row (text in `detail`)
    "nonfinite_latents",  # encoder stage: NaN/inf in the VAE latents
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row_index", pa.int64()),
        pa.field("reason", pa.string()),  # one of QUARANTINE_REASONS
        pa.field("detail", pa.string()),  # human-readable, e.g. "jpg_1: image file is truncated"
        # The original data, nullable. Labels are parsed to float64 (NaN kept); a non-numeric label is
        # null here and its raw text is quoted in `detail`.
        pa.field("caption", pa.string()),
        pa.field("jpg_0", pa.binary()),
        pa.field("jpg_1", pa.binary()),
        pa.field("label_0", pa.float64()),
        pa.field("label_1", pa.float64()),
    ]
)

# ---------------------------------------------------------------------------------------------------------
# Pair identity
# ---------------------------------------------------------------------------------------------------------

SOURCE_KEY_CHARS = 12


def _short_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:SOURCE_KEY_CHARS]


def make_source_key(path: str | os.PathLike[str]) -> str:
    """Short stable key of a local data file: first 12 hex of sha1(``"<basename>\\0<size in bytes>"``).

    Trade-off: basename + size (not the absolute path) keeps every pair_id, and so every cache shard and
    every (seed, pair_id)-derived random draw, unchanged when the dataset directory is moved, copied to
    node-local disk, or mounted at a different path on another Ray node. It does not hash the content,
    which for Pick-a-Pic means 335 GB. The price: two *different* files with the same basename and the
    same byte size would collide; ``resolve_source`` detects collisions among the files it resolves and
    raises. Rewriting a file (any change of size) changes its key: a changed file is new data.
    """
    if is_uri(path):  # an object-store file: the same basename + size rule
        loc = location(path)
        return _short_sha1(f"{loc.name}\0{loc.size()}")
    p = Path(path)
    return _short_sha1(f"{p.name}\0{p.stat().st_size}")


def make_hub_source_key(dataset_id: str, split: str) -> str:
    """Source key of a hub dataset split: first 12 hex of sha1(``"hub:<id>:<split>"``)."""
    return _short_sha1(f"hub:{dataset_id}:{split}")


def make_pair_id(source_key: str, row_index: int) -> str:
    """Deterministic pair id ``"<source_key>:<row_index>"``, e.g. ``"3f2a9c0d1e7b:1234"``.

    ``row_index`` is the row in the source file (not in a fragment), so the id does not depend on how the
    file was split into fragments, on ``max_pairs``, or on which other files were read alongside.
    """
    if row_index < 0:
        raise ValueError(f"row_index must be >= 0, got {row_index}")
    return f"{source_key}:{int(row_index)}"


def pair_rng(seed: int, pair_id: str, purpose: str) -> np.random.Generator:
    """Random generator private to one pair and one purpose, e.g. ``pair_rng(seed, pid, "tie")``.

    Seeded from sha256(``"<seed>:<purpose>:<pair_id>"``), so the draw depends neither on the order in
    which pairs are processed nor on which Ray task processes them. Use distinct ``purpose`` strings
    ("tie", "transform", ...) so that independent decisions do not share random numbers.
    """
    digest = hashlib.sha256(f"{int(seed)}:{purpose}:{pair_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


if __name__ == "__main__":
    for _name in ("PICKAPIC_SCHEMA", "MAPO_SCHEMA", "PAIR_SCHEMA", "QUARANTINE_SCHEMA"):
        print(f"{_name}:\n{globals()[_name]}\n")
