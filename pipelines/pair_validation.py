"""Row checks of Pick-a-Pic-schema data: every row becomes a canonical preference pair (chosen first) or
a quarantine row with its reason (``schema.QUARANTINE_REASONS``); a bad row is never fatal.

Pure functions over pyarrow / PIL (no Ray): :mod:`pipelines.cache_rows` calls
:func:`validate_and_canonicalize` inside Ray Data tasks, one :class:`pipelines.pickapic.Fragment` at a time.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import pyarrow as pa
from PIL import Image, ImageFile

from pipelines.pickapic import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MIN_IMAGE_SIDE,
    LABEL_SUM_TOL,
    TIE_POLICIES,
    Fragment,
    TiePolicy,
    check_columns,
    label_value,
    normalize_image_columns,
)
from pipelines.schema import PAIR_SCHEMA, PICKAPIC_REQUIRED, QUARANTINE_REASONS, QUARANTINE_SCHEMA, pair_rng

logger = logging.getLogger(__name__)

_REASON_RANK = {reason: rank for rank, reason in enumerate(QUARANTINE_REASONS)}


class _Rejected(Exception):
    """A row failed a check: ``reason`` is one of QUARANTINE_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _as_bytes(value: Any) -> bytes | None:
    """Image cell -> bytes (binary, large_binary, or an HF Image struct {"bytes", "path"})."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict) and "bytes" in value:
        return _as_bytes(value["bytes"])
    raise TypeError(f"image cell of type {type(value).__name__} is not bytes")


def _check_caption(caption: Any, max_chars: int) -> None:
    if caption is None or not str(caption).strip():
        raise _Rejected(
            "empty_caption", "caption is null" if caption is None else "caption is empty or whitespace"
        )
    if len(str(caption)) > max_chars:
        raise _Rejected("caption_too_long", f"caption has {len(str(caption))} characters > {max_chars}")


def _check_labels(raw_0: Any, raw_1: Any) -> tuple[float, float]:
    """Parsed ``(label_0, label_1)``: numeric, finite, in [0, 1], summing to 1."""
    raws = {"label_0": raw_0, "label_1": raw_1}
    values = {name: label_value(raw) for name, raw in raws.items()}
    nan = [name for name, v in values.items() if v is not None and math.isnan(v)]
    if nan:
        raise _Rejected("nan_label", " and ".join(nan) + " NaN")
    for name, v in values.items():
        if v is None:
            what = "null" if raws[name] is None else f"{raws[name]!r}, not a number"
            raise _Rejected("bad_label", f"{name} is {what}")
        if not 0.0 <= v <= 1.0:
            raise _Rejected("bad_label", f"{name}={v!r} is outside [0, 1]")
    l0, l1 = values["label_0"], values["label_1"]
    if abs(l0 + l1 - 1.0) > LABEL_SUM_TOL:
        raise _Rejected("labels_not_sum_to_one", f"label_0 + label_1 = {l0!r} + {l1!r} = {l0 + l1!r}")
    return l0, l1


def _decode_failure(stage: str, e: BaseException) -> _Rejected:
    """A decoder that ran out of data is ``truncated_image``; anything else is ``undecodable_image``."""
    text = f"{stage}: {type(e).__name__}: {e}"
    truncated = isinstance(e, EOFError) or "truncat" in str(e).lower()
    return _Rejected("truncated_image" if truncated else "undecodable_image", text)


def _decode_checked(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
    """Header -> size limits -> ``verify()`` -> full ``load()``; returns the decoded image.

    The size comes from the header (``Image.open`` decodes nothing). Pillow itself only *warns* for
    ``MAX_IMAGE_PIXELS`` < pixels <= 2x that and raises ``DecompressionBombError`` above: both are caught
    (the warning is an exception only under ``-W error``), and our own, lower, limit is compared here.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Rejected("image_too_large", f"Pillow: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise _Rejected(
            "undecodable_image", f"open: not an image format Pillow reads; starts {data[:12]!r}"
        ) from e
    except Exception as e:
        raise _decode_failure("open", e) from e
    width, height = image.size
    if width * height > max_pixels:
        raise _Rejected(
            "image_too_large",
            f"{image.format} header says {width}x{height} = {width * height} pixels > {max_pixels}",
        )
    if min(width, height) < min_side:
        raise _Rejected(
            "image_too_small", f"{image.format} header says {width}x{height}; min side {min_side}"
        )
    try:
        image.verify()
    except Exception as e:
        raise _decode_failure("verify", e) from e
    try:
        image = Image.open(io.BytesIO(data))  # verify() leaves the image unusable: reopen
        image.load()
    except Exception as e:
        raise _decode_failure("decode", e) from e
    return image


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    if a.size != b.size:
        return False
    if a.mode != b.mode or a.mode not in ("RGB", "L", "RGBA"):
        a, b = a.convert("RGBA"), b.convert("RGBA")
    return a.tobytes() == b.tobytes()


def _check_images(raw_0: Any, raw_1: Any, max_pixels: int, min_side: int) -> None:
    """Both images non-empty, within size limits, decodable to the end, and not identical.

    Both images are checked; when both fail, the reason that comes first in QUARANTINE_REASONS wins.
    Identical means same bytes, or (re-encoded) same decoded size, mode and pixels.
    """
    images = {"jpg_0": _as_bytes(raw_0), "jpg_1": _as_bytes(raw_1)}
    for name, data in images.items():
        if not data:
            raise _Rejected("empty_image", f"{name} is {'null' if data is None else '0 bytes'}")
    decoded, failures = [], []
    for name, data in images.items():
        try:
            decoded.append(_decode_checked(data, max_pixels, min_side))
        except _Rejected as r:
            failures.append(_Rejected(r.reason, f"{name}: {r.detail}"))
    if failures:
        raise min(failures, key=lambda r: _REASON_RANK[r.reason])
    if images["jpg_0"] == images["jpg_1"]:
        raise _Rejected("identical_images", "jpg_0 and jpg_1 are the same bytes")
    if _same_pixels(*decoded):
        raise _Rejected("identical_images", "jpg_0 and jpg_1 decode to the same pixels")


def _check_row(
    row: dict[str, Any], max_caption_chars: int, max_pixels: int, min_side: int
) -> tuple[float, float]:
    """Run every row check in QUARANTINE_REASONS order; return the parsed labels or raise _Rejected."""
    _check_caption(row["caption"], max_caption_chars)
    labels = _check_labels(row["label_0"], row["label_1"])
    _check_images(row["jpg_0"], row["jpg_1"], max_pixels, min_side)
    return labels


def _safe(fn: Any, value: Any) -> Any:
    try:
        return fn(value)
    except (TypeError, ValueError):
        return None


def _canonical_pair(
    row: dict[str, Any], pair_id: str, limits: tuple[int, int, int], *, tie_policy: TiePolicy, seed: int
) -> dict[str, Any]:
    """The checked row as a pair (chosen first), or :class:`_Rejected`; ``limits`` = (max caption chars,
    max image pixels, min image side)."""
    l0, l1 = _check_row(row, *limits)
    is_tie = abs(l0 - l1) <= LABEL_SUM_TOL  # with the sum check: both 0.5
    if is_tie and tie_policy == "drop":
        raise _Rejected("tie", f"label_0 = label_1 = {l0!r} (tie_policy='drop')")
    if is_tie:
        swapped = tie_policy == "random" and bool(pair_rng(seed, pair_id, "tie").random() < 0.5)
    else:
        swapped = l0 < l1
    col_w, col_l = ("jpg_1", "jpg_0") if swapped else ("jpg_0", "jpg_1")
    return {
        "pair_id": pair_id,
        "caption": str(row["caption"]),
        "jpg_w": _as_bytes(row[col_w]),
        "jpg_l": _as_bytes(row[col_l]),
        "label_w": l1 if swapped else l0,
        "label_l": l0 if swapped else l1,
        "is_tie": is_tie,
        "swapped": swapped,
    }


def validate_and_canonicalize(
    table: pa.Table,
    fragment: Fragment,
    *,
    tie_policy: TiePolicy = "drop",
    seed: int = 0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
) -> tuple[pa.Table, pa.Table]:
    """Check every row of ``table`` (= ``fragment.read()``) and canonicalise the good ones.

    Returns ``(pairs, quarantine)``: ``pairs`` in ``PAIR_SCHEMA`` (chosen first: swapped when
    ``label_0 < label_1``), ``quarantine`` in ``QUARANTINE_SCHEMA``; every input row lands in exactly one.
    Checks run in ``QUARANTINE_REASONS`` order and the first failure names the row: caption (empty, too
    long), labels (NaN, non-numeric/out of [0, 1], not summing to 1), images (empty, over
    ``max_image_pixels`` or under ``min_image_side`` from the header, undecodable, truncated,
    identical), then ties (``label_0 == label_1 == 0.5``) by ``tie_policy``:

    * ``drop``   -- quarantine with reason ``tie`` (the official Diffusion-DPO setting);
    * ``random`` -- keep, ``is_tie=True``, order drawn from ``pair_rng(seed, pair_id, "tie")``;
    * ``keep``   -- keep, ``is_tie=True``, source order.

    An unexpected exception on a row quarantines it as ``invalid_row`` (exception text in ``detail``);
    it never fails the shard. Images are decoded once each (plus a header ``verify()``) and discarded.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set globally by some imported code): truncated "
            "images would decode silently. Find and remove the code that sets it."
        )
    check_columns(table, fragment.source)
    if table.num_rows != fragment.num_rows:
        raise ValueError(f"table has {table.num_rows} rows but {fragment} covers {fragment.num_rows}")
    table = normalize_image_columns(table)
    columns = {name: table.column(name).to_pylist() for name in PICKAPIC_REQUIRED}
    pairs: dict[str, list[Any]] = {name: [] for name in PAIR_SCHEMA.names}
    quarantine: dict[str, list[Any]] = {name: [] for name in QUARANTINE_SCHEMA.names}

    limits = (max_caption_chars, max_image_pixels, min_image_side)
    for i in range(table.num_rows):
        row = {name: values[i] for name, values in columns.items()}
        pair_id, row_index = fragment.pair_id(i), fragment.start + i
        try:
            values = _canonical_pair(row, pair_id, limits, tie_policy=tie_policy, seed=seed)
        except _Rejected as r:
            _append_quarantine(quarantine, row, pair_id, fragment.source, row_index, r.reason, r.detail)
            continue
        except Exception as e:  # a bad row must never fail the shard
            logger.warning("%s row %d: unexpected %s: %s", fragment.source, row_index, type(e).__name__, e)
            detail = f"{type(e).__name__}: {e}"
            _append_quarantine(quarantine, row, pair_id, fragment.source, row_index, "invalid_row", detail)
            continue
        for name, value in {**values, "source": fragment.source, "row_index": row_index}.items():
            pairs[name].append(value)

    out_pairs = pa.table(pairs, schema=PAIR_SCHEMA)
    out_quarantine = pa.table(quarantine, schema=QUARANTINE_SCHEMA)
    logger.debug(
        "%s [%d, %d): %d pairs, %d quarantined",
        fragment.source,
        fragment.start,
        fragment.stop,
        out_pairs.num_rows,
        out_quarantine.num_rows,
    )
    return out_pairs, out_quarantine


def _append_quarantine(
    out: dict[str, list[Any]],
    row: dict[str, Any],
    pair_id: str,
    source: str,
    row_index: int,
    reason: str,
    detail: str,
) -> None:
    caption = row["caption"]
    values = {
        "pair_id": pair_id,
        "source": source,
        "row_index": row_index,
        "reason": reason,
        "detail": detail,
        "caption": None if caption is None else str(caption),
        "jpg_0": _safe(_as_bytes, row["jpg_0"]),
        "jpg_1": _safe(_as_bytes, row["jpg_1"]),
        "label_0": label_value(row["label_0"]),
        "label_1": label_value(row["label_1"]),
    }
    for name, value in values.items():
        out[name].append(value)


def quarantine_counts(quarantine: pa.Table) -> dict[str, int]:
    """``{reason: count}`` over every reason in QUARANTINE_REASONS (zeros included), for manifests."""
    counts = dict.fromkeys(QUARANTINE_REASONS, 0)
    for reason in quarantine.column("reason").to_pylist():
        counts[reason] += 1
    return counts
