"""Reading a latent cache for training: the inverse of :mod:`pipelines.latent_cache`'s writer.

* :func:`cache_dataset`: the training columns of a cache as a Ray Dataset, in shard order;
* :func:`batch_from_table`: a pyarrow batch of cache rows -> :class:`PreferenceBatch` tensors;
* :func:`sample_captions`: the first distinct captions (prompts of the end-of-run sample grid).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import torch

from pipelines.cache_format import split_columns
from pipelines.sharded_build import read_parquet
from pipelines.tensor_columns import to_tensor
from prefopt_core.objective import PreferenceBatch
from prefopt_core.storage import Location, location

logger = logging.getLogger(__name__)

#: Cache columns that describe image geometry (already folded into conditioning): not read for training.
GEOMETRY_COLUMNS = ("original_size_w", "original_size_l", "crop_top_left", "crop_top_left_l")


def training_columns(manifest: dict) -> list[str]:
    """The cache columns training reads: ``pair_key`` and every tensor column but the geometry ones."""
    return [c for c in ["pair_key", *manifest["columns"]] if c not in GEOMETRY_COLUMNS]


def batch_from_table(table: pa.Table, columns: dict[str, list[int]]) -> PreferenceBatch:
    """A cache batch of ``B`` rows (pyarrow) -> :class:`PreferenceBatch` whose tensors have shape
    ``(B, *columns[name])``, the per-row shapes the manifest records."""
    shared, side, ref = split_columns(columns)
    return PreferenceBatch(
        pair_key=torch.from_numpy(table["pair_key"].to_numpy().copy()),
        latents_w=to_tensor(table["latents_w"], columns["latents_w"]),
        latents_l=to_tensor(table["latents_l"], columns["latents_l"]),
        cond={k: to_tensor(table[k], columns[k]) for k in shared},
        cond_w={k: to_tensor(table[f"{k}_w"], columns[f"{k}_w"]) for k in side},
        cond_l={k: to_tensor(table[f"{k}_l"], columns[f"{k}_l"]) for k in side},
        ref_err_w=to_tensor(table["ref_err_w"], columns["ref_err_w"]) if ref else None,
        ref_err_l=to_tensor(table["ref_err_l"], columns["ref_err_l"]) if ref else None,
    )


def read_cache_table(cache_dir: str | Path | Location, manifest: dict) -> pa.Table:
    """Every shard's training columns, concatenated in shard order (for one-process training and tests)."""
    columns = training_columns(manifest)
    root = location(cache_dir)
    return pa.concat_tables(read_parquet(root / f, columns) for f in manifest["files"])


def cache_dataset(cache_dir: str | Path | Location, manifest: dict, *, driver_read_max_mb: float):
    """The training columns of the latent cache as a Ray Dataset, in shard order.

    A cache of at most ``driver_read_max_mb`` on disk is read here with pyarrow and put into the object
    store once (``from_arrow``): no read tasks to schedule, and every epoch re-reads memory. A larger one is
    read by Ray Data tasks and streamed each epoch, so it never has to fit in the object store. Both give
    the same rows in the same order. ``cache_dir`` may be an object-store URI (Ray Data reads it natively).
    """
    import ray.data

    columns = training_columns(manifest)
    files = [location(cache_dir) / f for f in manifest["files"]]
    size_mb = sum(f.size() for f in files) / 2**20
    if size_mb <= driver_read_max_mb:
        logger.info("cache %s: %.1f MB, read by the driver into the object store", cache_dir, size_mb)
        return ray.data.from_arrow([read_parquet(f, columns) for f in files])
    logger.info("cache %s: %.1f MB, streamed by Ray Data read tasks", cache_dir, size_mb)
    return ray.data.read_parquet([str(f) for f in files], columns=columns)


def sample_captions(cache_dir: str | Path | Location, manifest: dict, n: int) -> list[str]:
    """The first ``n`` distinct captions of the cache, in shard order; reads nothing when ``n <= 0``."""
    out: list[str] = []
    if n <= 0:
        return out
    for f in manifest["files"]:
        for caption in read_parquet(location(cache_dir) / f, ["caption"])["caption"].to_pylist():
            if caption not in out:
                out.append(caption)
            if len(out) >= n:
                return out
    return out
