"""Online pairs: best vs worst of each prompt's scored samples, written as latent-cache rows.

:func:`pair_best_worst` decides per prompt (see :mod:`pipelines.online` for the rules);
:func:`kept_table` turns the kept pairs of a chunk into latent-cache rows (:func:`encoded_kept_table`
encodes their conditioning first: the round mode's shards and the streaming mode's rows), :func:`skipped_table` the
others into ``SKIPPED_SCHEMA`` rows (scores, seeds and the reason: nothing is lost), and
:func:`online_statistics` summarises a finished round for its manifest.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.cache_format import SHAPES_KEY, pair_key
from pipelines.tensor_columns import to_column

if TYPE_CHECKING:
    from pipelines.online import OnlineSettings

SkipReason = Literal["margin_below_threshold", "nonfinite_samples", "nonfinite_conditioning"]
SKIP_REASONS: tuple[str, ...] = get_args(SkipReason)
#: Folder of the prompts that gave no pair (one file per chunk, like the shards).
SKIPPED_DIR = "skipped"


# ---------------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class PairChoice:
    """The decision for one prompt. ``best``/``worst`` are sample indices (-1 when undefined)."""

    best: int
    worst: int
    margin: float  # score[best] - score[worst]; NaN when fewer than two usable samples
    kept: bool
    reason: str  # "kept" or a SkipReason


def pair_best_worst(scores: np.ndarray, min_margin: float) -> list[PairChoice]:
    """``(P, K)`` scores -> one :class:`PairChoice` per prompt.

    A non-finite score marks an unusable sample (the caller sets NaN for samples with non-finite latents).
    Among the usable samples, ``best`` is the first index of the maximum, ``worst`` the first index of the
    minimum; kept iff ``margin = score[best] - score[worst] > min_margin`` (strict). Fewer than two usable
    samples: ``nonfinite_samples``; otherwise not kept: ``margin_below_threshold``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (P, K) with K >= 2, got shape {scores.shape}")
    out = []
    for row in scores:
        usable = np.isfinite(row)
        if usable.sum() < 2:
            out.append(PairChoice(-1, -1, math.nan, False, "nonfinite_samples"))
            continue
        best = int(np.argmax(np.where(usable, row, -np.inf)))
        worst = int(np.argmin(np.where(usable, row, np.inf)))
        margin = float(row[best] - row[worst])
        kept = margin > min_margin
        out.append(PairChoice(best, worst, margin, kept, "kept" if kept else "margin_below_threshold"))
    return out


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class ChunkResult:
    """What one chunk produced: the decisions and per-sample data of its prompts, in prompt order."""

    prompt_indices: list[int]
    captions: list[str]
    seeds: np.ndarray  # (P, K) int64
    scores: np.ndarray  # (P, K) float64, NaN for unusable samples
    choices: list[PairChoice]
    latents_w: list[torch.Tensor]  # one (C, h, w) per kept prompt, in prompt order
    latents_l: list[torch.Tensor]


def kept_table(
    result: ChunkResult,
    settings: OnlineSettings,
    cond: dict[str, torch.Tensor],
    side: dict[str, torch.Tensor],
) -> pa.Table:
    """Latent-cache rows of the kept pairs (``cond``: per-caption conditioning ``(B, ...)``; ``side``:
    per-side conditioning ``{"<name>_w"|"<name>_l": (B, ...)}``), with ``prefopt.shapes`` metadata."""
    kept = [i for i, c in enumerate(result.choices) if c.kept]
    n, res = len(kept), settings.resolution
    pair_ids = [f"online-r{settings.round}:{result.prompt_indices[i]}" for i in kept]
    lat_w, lat_l = torch.stack(result.latents_w), torch.stack(result.latents_l)  # (B, C, h, w)
    best = [result.choices[i].best for i in kept]
    worst = [result.choices[i].worst for i in kept]
    full = np.full((n, 2), res, np.int64)  # original size (h, w): the sample is the whole image
    zeros = np.zeros((n, 2), np.int64)  # crop top-left: no crop
    columns: dict[str, Any] = {
        "pair_id": pa.array(pair_ids, pa.string()),
        "pair_key": pa.array([pair_key(p) for p in pair_ids], pa.int64()),
        "caption": pa.array([result.captions[i] for i in kept], pa.string()),
        "source": pa.array([settings.source] * n, pa.string()),
        "row_index": pa.array([result.prompt_indices[i] for i in kept], pa.int64()),
        "label_w": pa.array([1.0] * n, pa.float64()),
        "label_l": pa.array([0.0] * n, pa.float64()),
        "is_tie": pa.array([False] * n, pa.bool_()),
        "swapped": pa.array([False] * n, pa.bool_()),
        "original_size_w": to_column(full),
        "original_size_l": to_column(full),
        "crop_top_left": to_column(zeros),
        "crop_top_left_l": to_column(zeros),
        "flipped": pa.array([False] * n, pa.bool_()),
        "latents_w": to_column(lat_w),
        "latents_l": to_column(lat_l),
        **{name: to_column(value) for name, value in cond.items()},
        **{name: to_column(value) for name, value in side.items()},
        "round": pa.array([settings.round] * n, pa.int64()),
        "score_w": pa.array([result.scores[i, b] for i, b in zip(kept, best)], pa.float64()),
        "score_l": pa.array([result.scores[i, w] for i, w in zip(kept, worst)], pa.float64()),
        "seed_w": pa.array([int(result.seeds[i, b]) for i, b in zip(kept, best)], pa.int64()),
        "seed_l": pa.array([int(result.seeds[i, w]) for i, w in zip(kept, worst)], pa.int64()),
        "scores": pa.array([result.scores[i].tolist() for i in kept], pa.list_(pa.float64())),
        "seeds": pa.array([result.seeds[i].tolist() for i in kept], pa.list_(pa.int64())),
    }
    shapes = {name: list(_row_shape(v)) for name, v in [("latents_w", lat_w), ("latents_l", lat_l)]}
    shapes.update({name: list(_row_shape(v)) for name, v in [*cond.items(), *side.items()]})
    shapes.update(original_size_w=[2], original_size_l=[2], crop_top_left=[2], crop_top_left_l=[2])
    table = pa.table(columns)
    return table.replace_schema_metadata({SHAPES_KEY: json.dumps(shapes, sort_keys=True)})


def encoded_kept_table(adapter: Any, result: ChunkResult, settings: OnlineSettings) -> pa.Table | None:
    """Latent-cache rows of the kept pairs of ``result`` with their captions' conditioning encoded by
    ``adapter`` (``encode_prompts``, ``side_conditioning``); pairs whose conditioning is not finite become
    ``nonfinite_conditioning`` skips (in place). ``None`` when no pair is left."""
    kept = [i for i, c in enumerate(result.choices) if c.kept]
    if not kept:
        return None
    cond = adapter.encode_prompts([result.captions[i] for i in kept])  # {name: (B, ...)}
    finite = torch.ones(len(kept), dtype=torch.bool)  # (B,)
    for value in cond.values():
        finite &= torch.isfinite(value).flatten(1).all(1)
    if not bool(finite.all()):
        unkeep(result, [i for i, ok in zip(kept, finite.tolist()) if not ok], "nonfinite_conditioning")
        cond = {name: value[finite] for name, value in cond.items()}
    n, res = int(finite.sum()), settings.resolution
    if n == 0:
        return None
    full = torch.full((n, 2), res, dtype=torch.int64)  # original size: the whole image
    zeros = torch.zeros((n, 2), dtype=torch.int64)  # crop top-left: no crop
    side = adapter.side_conditioning(full, zeros, res)  # the same for both sides
    side = {f"{name}_{s}": value for name, value in side.items() for s in ("w", "l")}
    return kept_table(result, settings, cond, side)


def _row_shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape[1:]) if value.ndim > 1 else (1,)


SKIPPED_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),
        pa.field("row_index", pa.int64()),  # prompt index
        pa.field("round", pa.int64()),
        pa.field("reason", pa.string()),  # one of SKIP_REASONS
        pa.field("margin", pa.float64()),  # score_best - score_worst (NaN if undefined)
        pa.field("score_best", pa.float64()),
        pa.field("score_worst", pa.float64()),
        pa.field("seed_best", pa.int64()),  # -1 if undefined
        pa.field("seed_worst", pa.int64()),
        pa.field("scores", pa.list_(pa.float64())),  # (K,) per sample, NaN = unusable
        pa.field("seeds", pa.list_(pa.int64())),  # (K,) regenerate any sample from these
    ]
)


def skipped_table(result: ChunkResult, settings: OnlineSettings) -> pa.Table:
    """One row (``SKIPPED_SCHEMA``) per prompt that gave no pair."""
    rows = []
    for i, c in enumerate(result.choices):
        if c.kept:
            continue
        defined = c.best >= 0
        rows.append(
            {
                "pair_id": f"online-r{settings.round}:{result.prompt_indices[i]}",
                "caption": result.captions[i],
                "source": settings.source,
                "row_index": result.prompt_indices[i],
                "round": settings.round,
                "reason": c.reason,
                "margin": c.margin,
                "score_best": float(result.scores[i, c.best]) if defined else math.nan,
                "score_worst": float(result.scores[i, c.worst]) if defined else math.nan,
                "seed_best": int(result.seeds[i, c.best]) if defined else -1,
                "seed_worst": int(result.seeds[i, c.worst]) if defined else -1,
                "scores": result.scores[i].tolist(),
                "seeds": result.seeds[i].tolist(),
            }
        )
    return pa.Table.from_pylist(rows, schema=SKIPPED_SCHEMA)


def unkeep(result: ChunkResult, prompts: list[int], reason: str) -> None:
    """Turn the kept pairs of the chunk positions ``prompts`` into skipped ones with ``reason`` (in place)."""
    drop = set(prompts)
    kept = [i for i, c in enumerate(result.choices) if c.kept]
    result.latents_w = [t for i, t in zip(kept, result.latents_w) if i not in drop]
    result.latents_l = [t for i, t in zip(kept, result.latents_l) if i not in drop]
    for i in drop:
        c = result.choices[i]
        result.choices[i] = PairChoice(c.best, c.worst, c.margin, False, reason)


# ---------------------------------------------------------------------------------------------- statistics
def _skipped_stats(cache_dir: Path) -> tuple[list[str], Counter[str], list[float]]:
    files = sorted(p.relative_to(cache_dir).as_posix() for p in (cache_dir / SKIPPED_DIR).glob("f*.parquet"))
    reasons: Counter[str] = Counter()
    all_scores: list[float] = []
    for f in files:
        t = pq.read_table(cache_dir / f, columns=["reason", "scores"])
        reasons.update(t["reason"].to_pylist())
        all_scores += [x for row in t["scores"].to_pylist() for x in row]
    return files, reasons, all_scores


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def online_statistics(cache_dir: Path, manifest_files: list[str]) -> dict[str, Any]:
    """Counts and score statistics of a finished round (``None`` for a mean over nothing)."""
    score_w, score_l, all_scores = [], [], []
    for f in manifest_files:
        t = pq.read_table(cache_dir / f, columns=["score_w", "score_l", "scores"])
        score_w += t["score_w"].to_pylist()
        score_l += t["score_l"].to_pylist()
        all_scores += [x for row in t["scores"].to_pylist() for x in row]
    skipped_files, reasons, skipped_scores = _skipped_stats(cache_dir)
    margins = [w - l_ for w, l_ in zip(score_w, score_l)]
    return {
        "pairs_kept": len(score_w),
        "pairs_skipped": sum(reasons.values()),
        "skipped": {r: reasons.get(r, 0) for r in SKIP_REASONS},
        "skipped_files": skipped_files,
        "score_chosen_mean": _mean(score_w),
        "score_rejected_mean": _mean(score_l),
        "margin_mean": _mean(margins),
        "score_mean": _mean(all_scores + skipped_scores),
    }
