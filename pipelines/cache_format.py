"""What a latent-cache directory is: its format id, its manifest, its row keys and its tensor columns.

A cache directory (written by :mod:`pipelines.latent_cache` from Pick-a-Pic-schema pairs, or by
:mod:`pipelines.online` from sampled pairs) holds ``plan.json``, ``shards/*.parquet`` (one row per
pair: metadata columns plus ``FixedSizeList`` tensor columns whose per-row shapes are in the parquet
metadata ``prefopt.shapes``), ``quarantine/`` or ``skipped/`` files, and last ``manifest.json``, which
describes a complete cache. Training reads the manifest (:func:`read_manifest`), refuses a cache of
other encoders (:func:`check_cache_matches`) and splits its tensor columns (:func:`split_columns`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.sharded_build import FRAGMENT_NAMING, ShardedBuild, parquet_metadata, read_parquet
from prefopt_core.storage import Location, location

CACHE_FORMAT = "prefopt-latent-cache/1"
MANIFEST = "manifest.json"
#: Parquet key-value metadata of a shard: JSON ``{column: per-row shape}`` of its tensor columns.
SHAPES_KEY = "prefopt.shapes"
SHARDS_DIR = "shards"
QUARANTINE_DIR = "quarantine"

#: Tensor columns that are not conditioning of the denoiser.
NON_COND = frozenset(
    {
        "latents_w",
        "latents_l",
        "original_size_w",
        "original_size_l",
        "crop_top_left",
        "crop_top_left_l",
        "ref_err_w",
        "ref_err_l",
    }
)


@dataclass(frozen=True)
class CacheSettings:
    """Everything the rows of a cache depend on (its fingerprint is a hash of this)."""

    family: str
    pretrained: str
    resolution: int
    dtype: str
    max_sequence_length: int
    prediction_type: str | None
    crop: str
    random_flip: bool
    tie_policy: str
    max_image_pixels: int
    max_caption_chars: int
    seed: int
    batch_size: int = 16
    micro_conditioning: str = "per_image"
    #: reference.strategy=precomputed: {"epochs", "sampling", "logit_mean", "logit_std", "gamma", "bins",
    #: "reference"} -- the frozen reference's errors under the noise/timesteps training will draw
    precompute: dict | None = None


class CacheMismatchError(RuntimeError):
    """The cache was built for other encoders/settings than the model asks for (or in another format)."""


def model_fingerprint(adapter) -> dict:
    """What a cache's rows depend on in the model: encoder hashes and encoding settings (not its path)."""
    return {k: v for k, v in adapter.fingerprint().items() if k != "pretrained"}


def pair_key(pair_id: str) -> int:
    """Stable non-negative int64 key of a pair id (seeds per-pair noise in training)."""
    return int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little") & (
        (1 << 63) - 1
    )


def cache_file(
    cache_dir: str | Path | Location, kind: str, unit: int, first_row: int, suffix: str = ""
) -> Location:
    """``<cache_dir>/<kind>/fNNNNNN-rRRRRRRRRR<suffix>.parquet``: a file of unit ``unit`` (first row ``first_row``)."""
    return location(cache_dir) / kind / FRAGMENT_NAMING.name(unit, first_row, suffix)


def cache_build(
    cache_dir: str | Path | Location,
    *,
    build: str = "cache",
    dir_key: str = "cache.dir",
    other_kind: str = QUARANTINE_DIR,
    unit_name: str = "rows",
) -> ShardedBuild:
    """The resumable-build rules of a cache directory: units are fragments (or chunks) of rows named by
    ``row_index``, kept in ``shards/`` or ``other_kind`` (``quarantine/``; the online rounds' ``skipped/``);
    ``manifest.json`` is written last."""
    return ShardedBuild(
        cache_dir,
        build=build,
        dir_key=dir_key,
        kinds=(SHARDS_DIR, other_kind),
        row_column="row_index",
        marker=MANIFEST,
        unit_name=unit_name,
    )


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _relative_files(cache_dir: Location, kind: str) -> list[str]:
    return sorted(f"{kind}/{p.name}" for p in (cache_dir / kind).glob("f*.parquet"))


def write_manifest(
    cache_dir: str | Path | Location,
    fp: dict,
    source: str,
    *,
    num_fragments: int,
    num_input_rows: int,
    elapsed: float,
    rows_done: int,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Describe the ``shards/`` and ``quarantine/`` files now in ``cache_dir`` in ``manifest.json`` (written
    atomically; call it last, once the cache is complete). ``extra`` adds keys (e.g. the online rounds'
    ``num_skipped``); it may not replace one of the manifest's own."""
    cache_dir = location(cache_dir)
    files = _relative_files(cache_dir, SHARDS_DIR)
    qfiles = _relative_files(cache_dir, QUARANTINE_DIR)
    num_pairs = sum(parquet_metadata(cache_dir / f).num_rows for f in files)
    reasons: Counter[str] = Counter()
    for f in qfiles:
        reasons.update(read_parquet(cache_dir / f, ["reason"])["reason"].to_pylist())
    columns = {}
    if files:
        meta = parquet_metadata(cache_dir / files[0]).schema.to_arrow_schema().metadata
        columns = json.loads(meta[SHAPES_KEY.encode()])
    manifest = {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "fingerprint_hash": fingerprint_hash(fp),
        "source": source,
        "num_fragments": num_fragments,
        "num_input_rows": num_input_rows,
        "num_pairs": num_pairs,
        "num_quarantined": sum(reasons.values()),
        "quarantine": dict(sorted(reasons.items())),
        "files": files,
        "quarantine_files": qfiles,
        "columns": columns,
        "build_seconds": round(elapsed, 3),
        "rows_per_s": round(rows_done / elapsed, 3) if elapsed > 0 and rows_done else 0.0,
    }
    clash = sorted(set(extra or {}) & set(manifest))
    if clash:
        raise ValueError(f"extra manifest keys {clash} would replace the manifest's own")
    manifest.update(extra or {})
    (cache_dir / MANIFEST).write_json(manifest)
    return manifest


def read_manifest(cache_dir: str | Path | Location) -> dict:
    path = location(cache_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no latent cache at {cache_dir} (missing {MANIFEST}); build it with `prefopt cache CONFIG` "
            "(an interrupted build is finished by rerunning the same command)"
        )
    manifest = path.read_json()
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheMismatchError(f"{path} has format {manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
    return manifest


def check_cache_matches(
    manifest: dict, encoders: dict, resolution: int, cache_dir: str | Path | Location
) -> None:
    """Refuse a cache built with other encoders or at another resolution than the training model."""
    fp = manifest["fingerprint"]
    problems = []
    if fp["encoders"] != encoders:
        problems.append(f"encoders {fp['encoders']} != model's {encoders}")
    if fp["resolution"] != resolution:
        problems.append(f"resolution {fp['resolution']} != model.resolution {resolution}")
    if problems:
        raise CacheMismatchError(
            f"latent cache {cache_dir} does not match the model: "
            + "; ".join(problems)
            + ". Rebuild it for this model: `prefopt cache CONFIG cache.dir=<new dir>` (or delete the old one)."
        )


def tensor_columns(manifest: dict) -> dict[str, list[int]]:
    return {k: list(v) for k, v in manifest["columns"].items()}


def split_columns(columns: dict[str, list[int]]) -> tuple[list[str], list[str], bool]:
    """Tensor columns -> (shared conditioning names, per-side conditioning base names, has ref errors).

    Per-side conditioning is stored as ``<name>_w`` / ``<name>_l`` (e.g. SDXL ``time_ids_w``).
    """
    cond = [c for c in columns if c not in NON_COND]
    side = sorted({c[:-2] for c in cond if c.endswith(("_w", "_l"))})
    shared = sorted(c for c in cond if not c.endswith(("_w", "_l")))
    return shared, side, "ref_err_w" in columns
