"""Pick-a-Pic-schema pairs -> VAE latents + text embeddings, as resumable parquet shards + a manifest.

Ray Data pipeline (one direction, streaming, back-pressured)::

    fragment specs ──map_batches(read + validate + transform, CPU tasks)──▶ good rows (uint8 pixels)
        │                                  └─▶ quarantine/fNNNNNN-rRRRRRRRRR.parquet (bad rows + reason)
        ──map_batches(LatentEncoder, actor pool of cache.num_actors)──▶ latents + embeddings, written by
          the actor as shards/fNNNNNN-rRRRRRRRRR.parquet right after encoding ──▶ stats rows
    driver: progress (rows/s); at the end manifest.json, written atomically, last.

A *fragment* (``cache.rows_per_shard`` consecutive rows of one input file) is the unit of resume: every
row of a fragment ends up either in a cache shard or in a quarantine file, each written atomically
(temp file + rename). A rerun scans which fragments are complete, deletes the files of incomplete ones
and processes only those, so a build killed at any point ends, after a rerun, with exactly the rows of
an uninterrupted build. The fingerprint of everything that determines the rows (encoders, resolution,
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
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipelines.pickapic import Fragment, resolve_source, validate_and_canonicalize
from pipelines.plan import fingerprint_diff
from pipelines.schema import QUARANTINE_SCHEMA, pair_rng
from pipelines.tensor_columns import from_column, to_column, to_tensor
from pipelines.transforms import TransformConfig, transform_pair

logger = logging.getLogger(__name__)

CACHE_FORMAT = "prefopt-latent-cache/1"
MANIFEST = "manifest.json"
PLAN = "plan.json"
#: Manifest fingerprint keys that must match the training model (the rest describe the data).
MODEL_KEYS = ("encoders", "resolution")


class CacheMismatchError(RuntimeError):
    """The cache was built for other encoders/settings than the ones asked for."""


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


def model_fingerprint(adapter) -> dict:
    """What a cache's rows depend on in the model: encoder hashes and encoding settings (not its path)."""
    return {k: v for k, v in adapter.fingerprint().items() if k != "pretrained"}


def pair_key(pair_id: str) -> int:
    """Stable non-negative int64 key of a pair id (seeds per-pair noise in training)."""
    return int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little") & (
        (1 << 63) - 1
    )


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` as parquet via a temp file + rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file + rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fragment_file(kind: str, fragment: int, first_row: int) -> str:
    return f"{kind}/f{fragment:06d}-r{first_row:09d}.parquet"


# ---------------------------------------------------------------------------------------------- stage 1
def _read_validate_transform(batch: pa.Table, *, settings: dict, out_dir: str) -> pa.Table:
    """One fragment spec in -> its good rows with pixels out; its bad rows written to quarantine."""
    s = CacheSettings(**settings)
    outputs = []
    for spec in batch.to_pylist():
        fragment = Fragment(**json.loads(spec["fragment"]))
        index = int(spec["index"])
        table = fragment.read()
        pairs, quarantine = validate_and_canonicalize(
            table,
            fragment,
            tie_policy=s.tie_policy,
            seed=s.seed,
            max_image_pixels=s.max_image_pixels,
            max_caption_chars=s.max_caption_chars,
        )
        if quarantine.num_rows:
            atomic_write_table(
                quarantine, Path(out_dir) / _fragment_file("quarantine", index, fragment.start)
            )
        tcfg = TransformConfig(resolution=s.resolution, crop=s.crop, random_flip=s.random_flip)
        cols: dict[str, list] = {
            k: []
            for k in (
                "pixels_w",
                "pixels_l",
                "original_size_w",
                "original_size_l",
                "crop_top_left",
                "crop_top_left_l",
                "flipped",
            )
        }
        good = []
        bad = []
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
            cols["original_size_w"].append(list(px.original_size_w))
            cols["original_size_l"].append(list(px.original_size_l))
            cols["crop_top_left"].append(list(px.crop_top_left))
            cols["crop_top_left_l"].append(list(px.crop_top_left_l))
            cols["flipped"].append(bool(px.flipped))
        if bad:
            rows = pairs.take(pa.array([i for i, _ in bad], pa.int64()))
            q = _quarantine_from_pairs(rows, "undecodable_image", [d for _, d in bad])
            atomic_write_table(
                q,
                Path(out_dir)
                / _fragment_file("quarantine", index, fragment.start).replace(
                    ".parquet", "-transform.parquet"
                ),
            )
        kept = pairs.take(pa.array(good, pa.int64()))
        n = kept.num_rows
        shape = (3, s.resolution, s.resolution)
        out = pa.table(
            {
                "fragment": pa.array([index] * n, pa.int64()),
                "pair_id": kept["pair_id"],
                "pair_key": pa.array([pair_key(p) for p in kept["pair_id"].to_pylist()], pa.int64()),
                "caption": kept["caption"],
                "source": kept["source"],
                "row_index": kept["row_index"],
                "label_w": kept["label_w"],
                "label_l": kept["label_l"],
                "is_tie": kept["is_tie"],
                "swapped": kept["swapped"],
                "jpg_w": kept["jpg_w"],
                "jpg_l": kept["jpg_l"],
                "pixels_w": to_column(np.stack(cols["pixels_w"]) if n else np.zeros((0, *shape), np.uint8)),
                "pixels_l": to_column(np.stack(cols["pixels_l"]) if n else np.zeros((0, *shape), np.uint8)),
                "original_size_w": to_column(np.array(cols["original_size_w"], np.int64).reshape(n, 2)),
                "original_size_l": to_column(np.array(cols["original_size_l"], np.int64).reshape(n, 2)),
                "crop_top_left": to_column(np.array(cols["crop_top_left"], np.int64).reshape(n, 2)),
                "crop_top_left_l": to_column(np.array(cols["crop_top_left_l"], np.int64).reshape(n, 2)),
                "flipped": pa.array(cols["flipped"], pa.bool_()),
            }
        )
        outputs.append(out)
    return pa.concat_tables(outputs) if outputs else pa.table({})


def _to_uint8(chw: np.ndarray) -> np.ndarray:
    """``(3, R, R)`` float in [-1, 1] -> uint8 (exact for values that came from uint8 pixels)."""
    return np.clip(np.rint((chw + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _quarantine_from_pairs(pairs: pa.Table, reason: str, details: list[str]) -> pa.Table:
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
#: Parquet key-value metadata of a shard: JSON ``{column: per-row shape}`` of its tensor columns.
SHAPES_KEY = "prefopt.shapes"
#: Columns of a cache shard that are not tensors.
META_COLUMNS = (
    "pair_id",
    "pair_key",
    "caption",
    "source",
    "row_index",
    "label_w",
    "label_l",
    "is_tie",
    "swapped",
    "flipped",
)


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
            atomic_write_table(good, Path(out_dir) / _fragment_file("shards", int(frag), first_row))
        if bad.num_rows:
            q = _quarantine_from_pairs(
                bad, "nonfinite_latents", ["NaN/inf in latents or embeddings"] * bad.num_rows
            )
            atomic_write_table(
                q,
                Path(out_dir)
                / _fragment_file("quarantine", int(frag), first_row).replace(".parquet", "-latents.parquet"),
            )
        stats.append({"fragment": int(frag), "written": good.num_rows, "quarantined": bad.num_rows})
    return pa.Table.from_pylist(stats)


# ---------------------------------------------------------------------------------------------- driver
def _rows_by_fragment(cache_dir: Path) -> dict[int, set[int]]:
    """Row indices present (in shards or quarantine) per fragment index, from the files on disk."""
    present: dict[int, set[int]] = {}
    for kind in ("shards", "quarantine"):
        for f in sorted((cache_dir / kind).glob("f*.parquet")):
            frag = int(f.name[1:7])
            rows = pq.read_table(f, columns=["row_index"])["row_index"].to_pylist()
            present.setdefault(frag, set()).update(rows)
    return present


def _fragment_files(cache_dir: Path, frag: int) -> list[Path]:
    return [f for kind in ("shards", "quarantine") for f in (cache_dir / kind).glob(f"f{frag:06d}-*.parquet")]


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


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


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
    """Build (or finish) the cache; returns the manifest dict. Ray must already be initialised."""
    import ray

    from prefopt_core.models.registry import adapter_for

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for tmp in cache_dir.rglob(".*.tmp"):
        tmp.unlink()
    fragments = resolve_source(source, split=split, rows_per_fragment=rows_per_shard, max_pairs=max_pairs)
    adapter = adapter_for(settings, base_model_dir)
    fp = plan_fingerprint(settings, model_fingerprint(adapter), fragments)
    plan_path = cache_dir / PLAN
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old["fingerprint"] != fp:
            diff = fingerprint_diff(old["fingerprint"], fp)
            raise CacheMismatchError(
                f"{cache_dir} holds a cache built with other settings (differs in: {', '.join(diff)}); "
                "use another cache.dir or delete this one to rebuild"
            )
    else:
        atomic_write_json({"fingerprint": fp, "source": source}, plan_path)
    manifest_path = cache_dir / MANIFEST

    present = _rows_by_fragment(cache_dir)
    pending = []
    for i, frag in enumerate(fragments):
        expected = set(range(frag.start, frag.stop))
        if present.get(i) == expected:
            continue
        for f in _fragment_files(cache_dir, i):  # incomplete: start the fragment over
            f.unlink()
        pending.append(i)
    logger.info(
        "latent cache %s: %d fragments, %d done, %d to build",
        cache_dir,
        len(fragments),
        len(fragments) - len(pending),
        len(pending),
    )

    t0 = time.perf_counter()
    rows_done = 0
    if pending:
        if manifest_path.exists():
            manifest_path.unlink()  # a manifest only ever describes a complete cache
        specs = [{"index": i, "fragment": json.dumps(asdict(fragments[i]))} for i in pending]
        settings_d = asdict(settings)
        ds = ray.data.from_items(specs, override_num_blocks=len(specs))
        ds = ds.map_batches(
            _read_validate_transform,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"settings": settings_d, "out_dir": str(cache_dir)},
            num_cpus=0.5,
        )
        ds = ds.map_batches(
            LatentEncoder,
            fn_constructor_kwargs={
                "settings": settings_d,
                "base_model_dir": str(base_model_dir),
                "out_dir": str(cache_dir),
                "fail_after_batches": fail_after_batches,
            },
            batch_size=settings.batch_size,
            batch_format="pyarrow",
            concurrency=num_actors,
            num_cpus=cpus_per_actor,
            num_gpus=1 if _cluster_has_gpus() else 0,
        )
        last_log = t0
        for stat in ds.iter_rows():
            rows_done += int(stat["written"]) + int(stat["quarantined"])
            now = time.perf_counter()
            if now - last_log > 5:
                logger.info("cache: %d encoded rows, %.1f rows/s", rows_done, rows_done / (now - t0))
                last_log = now
    elapsed = time.perf_counter() - t0

    present = _rows_by_fragment(cache_dir)
    missing = [i for i, f in enumerate(fragments) if present.get(i) != set(range(f.start, f.stop))]
    if missing:
        raise RuntimeError(
            f"cache build ended with {len(missing)} incomplete fragments ({missing[:5]}...); rerun to finish"
        )
    manifest = write_manifest(
        cache_dir,
        fp,
        source,
        num_fragments=len(fragments),
        num_input_rows=sum(f.stop - f.start for f in fragments),
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


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def write_manifest(
    cache_dir: Path,
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
    files = sorted(p.relative_to(cache_dir).as_posix() for p in (cache_dir / "shards").glob("f*.parquet"))
    qfiles = sorted(
        p.relative_to(cache_dir).as_posix() for p in (cache_dir / "quarantine").glob("f*.parquet")
    )
    num_pairs = sum(pq.ParquetFile(cache_dir / f).metadata.num_rows for f in files)
    reasons: Counter[str] = Counter()
    for f in qfiles:
        reasons.update(pq.read_table(cache_dir / f, columns=["reason"])["reason"].to_pylist())
    columns = {}
    if files:
        columns = json.loads(pq.read_schema(cache_dir / files[0]).metadata[SHAPES_KEY.encode()])
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
    atomic_write_json(manifest, cache_dir / MANIFEST)
    return manifest


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no latent cache at {cache_dir} (missing {MANIFEST}); build it with `prefopt cache CONFIG` "
            "(an interrupted build is finished by rerunning the same command)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheMismatchError(f"{path} has format {manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
    return manifest


def check_cache_matches(manifest: dict, encoders: dict, resolution: int, cache_dir: str | Path) -> None:
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


def arrays_from_table(table: pa.Table, columns: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Decode the tensor columns of a cache table into ``(N, *shape)`` arrays."""
    return {
        name: from_column(table[name], shape) for name, shape in columns.items() if name in table.column_names
    }


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


def split_columns(columns: dict[str, list[int]]) -> tuple[list[str], list[str], bool]:
    """Tensor columns -> (shared conditioning names, per-side conditioning base names, has ref errors).

    Per-side conditioning is stored as ``<name>_w`` / ``<name>_l`` (e.g. SDXL ``time_ids_w``).
    """
    cond = [c for c in columns if c not in NON_COND]
    side = sorted({c[:-2] for c in cond if c.endswith(("_w", "_l"))})
    shared = sorted(c for c in cond if not c.endswith(("_w", "_l")))
    return shared, side, "ref_err_w" in columns
