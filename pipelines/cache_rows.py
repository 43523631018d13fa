"""Stage 1 of the latent-cache build: one fragment of input rows -> validated, transformed pairs.

A Ray Data task per fragment reads its rows (:class:`pipelines.pickapic.Fragment`), validates and
canonicalises them (:func:`pipelines.pair_validation.validate_and_canonicalize`), crops/resizes/flips both images
(:func:`pipelines.transforms.transform_pair`) and returns the good pairs with ``(3, R, R)`` uint8 pixels
for the encoder actors. Bad rows never reach the encoders: they are written, atomically, to the fragment's
quarantine files (``quarantine/fNNNNNN-rRRRRRRRRR.parquet`` for validation, ``...-transform.parquet``
for images that decoded in validation but not in the transform), with the reason.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipelines.cache_format import QUARANTINE_DIR, CacheSettings, cache_file, pair_key
from pipelines.pair_validation import validate_and_canonicalize
from pipelines.pickapic import Fragment
from pipelines.schema import QUARANTINE_SCHEMA, pair_rng
from pipelines.sharded_build import atomic_write_table
from pipelines.tensor_columns import to_column
from pipelines.transforms import TransformConfig, transform_pair

#: Columns of a pair that stage 1 passes on unchanged (after ``pair_id`` and ``pair_key``).
_PASSED_COLUMNS = (
    "caption",
    "source",
    "row_index",
    "label_w",
    "label_l",
    "is_tie",
    "swapped",
    "jpg_w",
    "jpg_l",
)
_GEOMETRY = ("original_size_w", "original_size_l", "crop_top_left", "crop_top_left_l")


def _read_validate_transform(batch: pa.Table, *, settings: dict, out_dir: str) -> pa.Table:
    """Fragment specs (``index``, ``fragment`` JSON) in -> their good rows with pixels out; bad rows are
    written to quarantine."""
    s = CacheSettings(**settings)
    outputs = []
    for spec in batch.to_pylist():
        fragment = Fragment(**json.loads(spec["fragment"]))
        index = int(spec["index"])
        pairs, quarantine = validate_and_canonicalize(
            fragment.read(),
            fragment,
            tie_policy=s.tie_policy,
            seed=s.seed,
            max_image_pixels=s.max_image_pixels,
            max_caption_chars=s.max_caption_chars,
        )
        if quarantine.num_rows:
            atomic_write_table(quarantine, cache_file(out_dir, QUARANTINE_DIR, index, fragment.start))
        outputs.append(_transform_fragment(pairs, s, index, fragment.start, out_dir))
    return pa.concat_tables(outputs) if outputs else pa.table({})


def _transform_fragment(pairs: pa.Table, s: CacheSettings, index: int, start: int, out_dir: str) -> pa.Table:
    """The canonical ``pairs`` of fragment ``index`` -> rows with pixels and geometry; the pairs whose
    images fail the transform go to ``quarantine/...-transform.parquet`` as ``undecodable_image``."""
    tcfg = TransformConfig(resolution=s.resolution, crop=s.crop, random_flip=s.random_flip)
    cols: dict[str, list] = {k: [] for k in ("pixels_w", "pixels_l", *_GEOMETRY, "flipped")}
    good, bad = [], []
    for i, row in enumerate(pairs.to_pylist()):
        try:
            px = transform_pair(
                row["jpg_w"], row["jpg_l"], tcfg, pair_rng(s.seed, row["pair_id"], "transform")
            )
        except Exception as exc:  # decoded fine in validation but not here: keep it, never crash
            bad.append((i, repr(exc)))
            continue
        good.append(i)
        cols["pixels_w"].append(_to_uint8(px.w))
        cols["pixels_l"].append(_to_uint8(px.l))
        for name in _GEOMETRY:
            cols[name].append(list(getattr(px, name)))
        cols["flipped"].append(bool(px.flipped))
    if bad:
        rows = pairs.take(pa.array([i for i, _ in bad], pa.int64()))
        q = quarantine_from_pairs(rows, "undecodable_image", [d for _, d in bad])
        atomic_write_table(q, cache_file(out_dir, QUARANTINE_DIR, index, start, "-transform"))
    kept = pairs.take(pa.array(good, pa.int64()))
    n = kept.num_rows
    empty = np.zeros((0, 3, s.resolution, s.resolution), np.uint8)
    columns = {
        "fragment": pa.array([index] * n, pa.int64()),
        "pair_id": kept["pair_id"],
        "pair_key": pa.array([pair_key(p) for p in kept["pair_id"].to_pylist()], pa.int64()),
        **{name: kept[name] for name in _PASSED_COLUMNS},
        "pixels_w": to_column(np.stack(cols["pixels_w"]) if n else empty),  # (n, 3, R, R) uint8
        "pixels_l": to_column(np.stack(cols["pixels_l"]) if n else empty),
        **{name: to_column(np.array(cols[name], np.int64).reshape(n, 2)) for name in _GEOMETRY},
        "flipped": pa.array(cols["flipped"], pa.bool_()),
    }
    return pa.table(columns)


def _to_uint8(chw: np.ndarray) -> np.ndarray:
    """``(3, R, R)`` float in [-1, 1] -> uint8 (exact for values that came from uint8 pixels)."""
    return np.clip(np.rint((chw + 1.0) * 127.5), 0, 255).astype(np.uint8)


def quarantine_from_pairs(pairs: pa.Table, reason: str, details: list[str]) -> pa.Table:
    """Quarantine rows for canonical pairs (chosen/rejected restored to jpg_0/jpg_1 source order)."""
    rows = []
    for row, detail in zip(pairs.to_pylist(), details, strict=True):
        swapped = bool(row.get("swapped"))
        j0, j1 = (row["jpg_l"], row["jpg_w"]) if swapped else (row["jpg_w"], row["jpg_l"])
        l0, l1 = (row["label_l"], row["label_w"]) if swapped else (row["label_w"], row["label_l"])
        rows.append(
            {
                "pair_id": row["pair_id"],
                "source": row["source"],
                "row_index": row["row_index"],
                "reason": reason,
                "detail": detail,
                "caption": row["caption"],
                "jpg_0": j0,
                "jpg_1": j1,
                "label_0": l0,
                "label_1": l1,
            }
        )
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
