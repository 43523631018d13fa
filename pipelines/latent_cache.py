"""Pick-a-Pic-schema pairs -> VAE latents + text embeddings, as resumable parquet shards + a manifest.

Ray Data pipeline (one direction, streaming, back-pressured)::

    fragment specs ──map_batches(read + validate + transform, CPU tasks)──▶ good rows (uint8 pixels)
        │                                  └─▶ quarantine/fNNNNNN-rRRRRRRRRR.parquet (bad rows + reason)
        ──map_batches(LatentEncoder, actor pool of cache.num_actors)──▶ latents + embeddings, written by
          the actor as shards/fNNNNNN-rRRRRRRRRR.parquet right after encoding ──▶ stats rows
    driver: progress (rows done/total, rows/s, quarantined so far, ETA) on the ``prefopt.progress`` logger;
    at the end manifest.json, written atomically, last.

A *fragment* (``cache.rows_per_shard`` consecutive rows of one input file) is the unit of resume: every
row of a fragment ends up either in a cache shard or in a quarantine file, each written atomically; the
resume rules (which fragments are complete, what is deleted, ``plan.json``) are those of
:mod:`pipelines.sharded_build`, so a build killed at any point ends, after a rerun, with exactly the rows
of an uninterrupted build. Stage 1 lives in :mod:`pipelines.cache_rows`, the directory format (manifest,
tensor columns, reading) in :mod:`pipelines.cache_format`. The fingerprint of everything that determines the rows (encoders, resolution,
transform, validation rules, source) is stored in ``plan.json`` at the start and in the manifest; a
cache directory is never mixed across fingerprints, and ``prefopt train`` refuses a cache whose encoder
fingerprint does not match its model.

This module never calls ``ray.init``: the caller (``ray_jobs``) owns the cluster connection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines.cache_format import (
    CACHE_FORMAT,
    QUARANTINE_DIR,
    SHAPES_KEY,
    SHARDS_DIR,
    CacheMismatchError,
    CacheSettings,
    cache_build,
    cache_file,
    check_cache_matches,
    model_fingerprint,
    pair_key,
    read_manifest,
    split_columns,
    tensor_columns,
    write_manifest,
)
from pipelines.cache_rows import _read_validate_transform, quarantine_from_pairs
from pipelines.pickapic import Fragment, resolve_source
from pipelines.progress import Progress
from pipelines.sharded_build import ShardedBuild, atomic_write_table, parquet_metadata, run_actor_pool
from pipelines.tensor_columns import to_column, to_tensor
from prefopt_core.storage import Location

logger = logging.getLogger(__name__)

#: The public API of the cache build; the directory format's names are re-exported for its readers.
__all__ = [
    "CacheMismatchError",
    "CacheSettings",
    "LatentEncoder",
    "build_cache",
    "check_cache_matches",
    "model_fingerprint",
    "pair_key",
    "plan_fingerprint",
    "read_manifest",
    "split_columns",
    "tensor_columns",
]


# ---------------------------------------------------------------------------------------------- stage 2
class LatentEncoder:
    """Ray Data actor: VAE + text encoders loaded once, applied to batches of pairs."""

    def __init__(
        self, settings: dict, base_model_dir: str, out_dir: str, fail_after_batches: int | None = None
    ) -> None:
        from prefopt_core.models.registry import adapter_for

        self.out_dir = out_dir
        self.fail_after_batches = fail_after_batches  # fault injection for resume tests
        self.batches_done = 0
        s = CacheSettings(**settings)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.resolution = s.resolution
        self.adapter = adapter_for(s, base_model_dir, device=device)
        self.reference = self.objective = None
        if s.precompute:
            self._setup_reference(s, device)

    def _setup_reference(self, s: CacheSettings, device: str) -> None:
        """Load the frozen reference once; its errors are computed for every (pair, epoch) at encode time."""
        from prefopt_core.models.base import TORCH_DTYPES
        from prefopt_core.objective import PreferenceObjective
        from prefopt_core.timesteps import TimestepConfig

        p = s.precompute
        self.epochs = int(p["epochs"])
        self.reference = self.adapter.load_denoiser(p.get("reference"), dtype=TORCH_DTYPES[s.dtype])
        self.reference.requires_grad_(False).eval().to(device)
        timesteps = TimestepConfig.from_mapping(p)
        self.objective = PreferenceObjective(
            self.adapter, loss_name="dpo", loss_params={}, timesteps=timesteps, seed=s.seed
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Encode a batch and write it (so a finished batch survives a later failure); -> stats rows."""
        return _write_shards(self.encode(batch), out_dir=self.out_dir)

    def encode(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if n == 0:
            return batch
        if self.fail_after_batches is not None and self.batches_done >= self.fail_after_batches:
            raise RuntimeError(f"injected encoder failure after {self.batches_done} batches")
        self.batches_done += 1
        shape = (3, self.resolution, self.resolution)
        px_w = to_tensor(batch["pixels_w"], shape).float() / 127.5 - 1.0  # (B, 3, R, R)
        px_l = to_tensor(batch["pixels_l"], shape).float() / 127.5 - 1.0
        latents = self.adapter.encode_images(torch.cat([px_w, px_l]))  # (2B, C, h, w)
        lat_w, lat_l = latents.chunk(2)
        cond = self.adapter.encode_prompts(batch["caption"].to_pylist())  # {name: (B, ...)}
        side_w = self.adapter.side_conditioning(
            to_tensor(batch["original_size_w"], (2,)),
            to_tensor(batch["crop_top_left"], (2,)),
            self.resolution,
        )
        side_l = self.adapter.side_conditioning(
            to_tensor(batch["original_size_l"], (2,)),
            to_tensor(batch["crop_top_left_l"], (2,)),
            self.resolution,
        )
        finite = torch.isfinite(lat_w).flatten(1).all(1) & torch.isfinite(lat_l).flatten(1).all(1)
        for v in cond.values():
            finite &= torch.isfinite(v).flatten(1).all(1)
        out = batch.drop_columns(["pixels_w", "pixels_l"])
        out = out.append_column("latents_w", to_column(lat_w)).append_column("latents_l", to_column(lat_l))
        for name, value in cond.items():
            out = out.append_column(name, to_column(value))
        for name, value in side_w.items():
            out = out.append_column(f"{name}_w", to_column(value))
        for name, value in side_l.items():
            out = out.append_column(f"{name}_l", to_column(value))
        shapes = {
            name: list(_row_shape(v))
            for name, v in [
                ("latents_w", lat_w),
                ("latents_l", lat_l),
                *cond.items(),
                *((f"{k}_w", v) for k, v in side_w.items()),
                *((f"{k}_l", v) for k, v in side_l.items()),
            ]
        }
        if self.reference is not None:
            ref_w, ref_l = self._reference_errors(batch, lat_w, lat_l, cond, side_w, side_l)
            out = out.append_column("ref_err_w", to_column(ref_w)).append_column(
                "ref_err_l", to_column(ref_l)
            )
            shapes.update(ref_err_w=[self.epochs], ref_err_l=[self.epochs])
        shapes.update(original_size_w=[2], original_size_l=[2], crop_top_left=[2], crop_top_left_l=[2])
        out = out.append_column("_shapes", pa.array([json.dumps(shapes, sort_keys=True)] * n, pa.string()))
        return out.append_column("finite", pa.array(finite.tolist(), pa.bool_()))

    @torch.no_grad()
    def _reference_errors(
        self, batch, lat_w, lat_l, cond, side_w, side_l
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, epochs)`` reference errors of chosen and rejected, with training's per-(pair, epoch) draws."""
        from prefopt_core.objective import PreferenceBatch

        pb = PreferenceBatch(
            pair_key=torch.from_numpy(batch["pair_key"].to_numpy().copy()),
            latents_w=lat_w,
            latents_l=lat_l,
            cond=cond,
            cond_w=side_w,
            cond_l=side_l,
        ).to(self.objective_device)
        errs_w, errs_l = [], []
        for epoch in range(self.epochs):
            noise, t = self.objective.draw(pb, epoch)
            e_w, e_l = self.objective.reference_errors(self.reference, pb, noise, t)
            errs_w.append(e_w.float().cpu())
            errs_l.append(e_l.float().cpu())
        return torch.stack(errs_w, dim=1), torch.stack(errs_l, dim=1)  # (B, E) each

    @property
    def objective_device(self) -> torch.device:
        return next(self.reference.parameters()).device


def _row_shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape[1:]) if value.ndim > 1 else (1,)


# ---------------------------------------------------------------------------------------------- stage 3
def _write_shards(batch: pa.Table, *, out_dir: str) -> pa.Table:
    """Write the encoded rows of each fragment in ``batch`` atomically; return one stats row per file."""
    stats = []
    if batch.num_rows == 0:
        return pa.table(
            {
                "fragment": pa.array([], pa.int64()),
                "written": pa.array([], pa.int64()),
                "quarantined": pa.array([], pa.int64()),
            }
        )
    fragments = batch["fragment"].to_numpy()
    for frag in np.unique(fragments):
        part = batch.filter(pc.equal(batch["fragment"], pa.scalar(int(frag), pa.int64())))
        first_row = int(pc.min(part["row_index"]).as_py())
        finite = part["finite"]
        shapes = part["_shapes"][0].as_py()
        good = part.filter(finite).drop_columns(["fragment", "finite", "jpg_w", "jpg_l", "_shapes"])
        good = good.replace_schema_metadata({SHAPES_KEY: shapes})
        bad = part.filter(pc.invert(finite))
        if good.num_rows:
            atomic_write_table(good, cache_file(out_dir, SHARDS_DIR, int(frag), first_row))
        if bad.num_rows:
            q = quarantine_from_pairs(
                bad, "nonfinite_latents", ["NaN/inf in latents or embeddings"] * bad.num_rows
            )
            atomic_write_table(q, cache_file(out_dir, QUARANTINE_DIR, int(frag), first_row, "-latents"))
        stats.append({"fragment": int(frag), "written": good.num_rows, "quarantined": bad.num_rows})
    return pa.Table.from_pylist(stats)


# ---------------------------------------------------------------------------------------------- driver
def plan_fingerprint(settings: CacheSettings, encoders: dict, fragments: list[Fragment]) -> dict:
    frag_hash = hashlib.sha1(
        json.dumps([asdict(f) | {"source": Path(f.source).name} for f in fragments], sort_keys=True).encode()
    ).hexdigest()[:16]
    s = asdict(settings)
    s.pop("batch_size")  # does not change rows
    return {
        "format": CACHE_FORMAT,
        "settings": s,
        "encoders": encoders,
        "resolution": settings.resolution,
        "fragments": frag_hash,
        "num_fragments": len(fragments),
    }


class _QuarantineCount:
    """Rows in the quarantine files that appeared since the build started (the files are written
    atomically, so a file seen is complete)."""

    def __init__(self, build: ShardedBuild) -> None:
        self._build = build
        self._seen = set(build.files(QUARANTINE_DIR))
        self.total = sum(_num_rows(f) for f in self._seen)

    def new_rows(self) -> int:
        new = set(self._build.files(QUARANTINE_DIR)) - self._seen
        self._seen |= new
        n = sum(_num_rows(f) for f in new)
        self.total += n
        return n


def _num_rows(path: Location) -> int:
    return parquet_metadata(path).num_rows


def _encode_pending(
    build: ShardedBuild,
    pending: list[int],
    fragments: list[Fragment],
    progress: Progress,
    *,
    base_model_dir: str | Path,
    settings: CacheSettings,
    num_actors: int,
    cpus_per_actor: float,
    fail_after_batches: int | None,
) -> int:
    """Run stages 1-3 over the ``pending`` fragments; -> rows written or quarantined by this call."""
    out_dir = str(build.root)
    settings_d = asdict(settings)
    quarantined = _QuarantineCount(build)

    def stage1(ds):
        return ds.map_batches(
            _read_validate_transform,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"settings": settings_d, "out_dir": out_dir},
            num_cpus=0.5,
        )

    ds = run_actor_pool(
        [{"index": i, "fragment": json.dumps(asdict(fragments[i]))} for i in pending],
        LatentEncoder,
        {
            "settings": settings_d,
            "base_model_dir": str(base_model_dir),
            "out_dir": out_dir,
            "fail_after_batches": fail_after_batches,
        },
        num_actors=num_actors,
        cpus_per_actor=cpus_per_actor,
        batch_size=settings.batch_size,
        before=stage1,
    )
    rows_done = 0
    for stat in ds.iter_rows():
        # quarantined rows are counted from their files: stage 1's never reach these stats
        n = int(stat["written"]) + quarantined.new_rows()
        rows_done += n
        progress.update(n, quarantined=quarantined.total)
    n = quarantined.new_rows()  # fragments whose every row was quarantined in stage 1
    progress.update(n, quarantined=quarantined.total)
    return rows_done + n


def build_cache(
    *,
    source: str,
    cache_dir: str | Path,
    base_model_dir: str | Path,
    settings: CacheSettings,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    rows_per_shard: int = 64,
    split: str | None = None,
    max_pairs: int | None = None,
    fail_after_batches: int | None = None,
) -> dict:
    """Build (or finish) the cache; returns the manifest dict. Ray must already be initialised.

    Raises :class:`pipelines.sharded_build.PlanMismatchError` for a directory built with other settings.
    """
    from prefopt_core.models.registry import adapter_for

    build = cache_build(cache_dir)
    fragments = resolve_source(source, split=split, rows_per_fragment=rows_per_shard, max_pairs=max_pairs)
    adapter = adapter_for(settings, base_model_dir)
    fp = plan_fingerprint(settings, model_fingerprint(adapter), fragments)
    build.open(fp, source=source)
    units = [range(f.start, f.stop) for f in fragments]
    pending, progress = build.start(units)
    t0 = time.perf_counter()
    rows_done = 0
    if pending:
        rows_done = _encode_pending(
            build,
            pending,
            fragments,
            progress,
            base_model_dir=base_model_dir,
            settings=settings,
            num_actors=num_actors,
            cpus_per_actor=cpus_per_actor,
            fail_after_batches=fail_after_batches,
        )
    elapsed = time.perf_counter() - t0
    build.finish(units)
    progress.finish()
    manifest = write_manifest(
        build.root,
        fp,
        source,
        num_fragments=len(fragments),
        num_input_rows=sum(len(u) for u in units),
        elapsed=elapsed,
        rows_done=rows_done,
    )
    logger.info(
        "latent cache complete: %d pairs, %d quarantined (%s), %.1f rows/s",
        manifest["num_pairs"],
        manifest["num_quarantined"],
        manifest["quarantine"],
        manifest["rows_per_s"],
    )
    return manifest
