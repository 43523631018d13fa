"""Prompt lists for the generating builds (regenerate, online rounds): from a text file, from the
``caption`` column of parquet, or the toy world's captions."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

logger = logging.getLogger(__name__)


def load_prompts(
    path: str | os.PathLike[str], num_prompts: int | None = None, *, dedupe: bool = True
) -> list[str]:
    """Context prompts from a text file (one per line) or parquet (file or directory) with ``caption``.

    Each prompt is stripped; empty ones (and null captions) are skipped, duplicates too when ``dedupe``
    (the first occurrence keeps its place), both with a logged count. Order is kept; ``num_prompts``
    keeps the first ones. Parquet is read column-only and stops once ``num_prompts`` are found.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"prompt source {path} does not exist (a .txt file or parquet with 'caption')"
        )
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1 or None, got {num_prompts}")
    prompts: list[str] = []
    seen: set[str] = set()
    counts = {"empty": 0, "duplicate": 0}

    def add(raw: Any) -> bool:
        """Add one raw prompt; True once ``num_prompts`` prompts are collected."""
        text = "" if raw is None else str(raw).strip()
        if not text:
            counts["empty"] += 1
        elif dedupe and text in seen:
            counts["duplicate"] += 1
        else:
            seen.add(text)
            prompts.append(text)
        return num_prompts is not None and len(prompts) >= num_prompts

    if path.is_dir() or path.suffix == ".parquet":
        _read_parquet_captions(path, add)
    else:
        for line in path.read_text(encoding="utf-8").splitlines():
            if add(line):
                break
    if counts["empty"] or counts["duplicate"]:
        logger.info(
            "%s: skipped %d empty and %d duplicate prompt(s)", path, counts["empty"], counts["duplicate"]
        )
    if not prompts:
        raise ValueError(f"{path} holds no non-empty prompt")
    logger.info("loaded %d prompt(s) from %s", len(prompts), path)
    return prompts


def _read_parquet_captions(path: Path, add) -> None:
    files = (
        sorted(
            f
            for f in path.rglob("*.parquet")
            if not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if path.is_dir()
        else [path]
    )
    if not files:
        raise FileNotFoundError(f"{path}: directory holds no .parquet file")
    for f in files:
        pf = pq.ParquetFile(f)
        if "caption" not in pf.schema_arrow.names:
            raise ValueError(
                f"{f}: no 'caption' column to read prompts from; columns: {pf.schema_arrow.names}"
            )
        for batch in pf.iter_batches(columns=["caption"], batch_size=4096):
            for caption in batch.column(0).to_pylist():
                if add(caption):
                    return


def toy_world_prompts() -> list[str]:
    """The 24 captions of the synthetic toy world (``"a red circle"``, ``"a red square"``, ...), colours
    outer, shapes inner: the default prompt source, so ``prefopt regenerate`` works out of the box."""
    from pipelines.toy_world import SHAPES, TOY_COLORS

    return [f"a {color} {shape}" for color in TOY_COLORS for shape in SHAPES]
