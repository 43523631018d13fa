"""``prefopt cache CONFIG``: build (or finish) the latent cache of a run. Also ``python -m ray_jobs cache``.

Resolves the source (``data.source``, or a synthetic Pick-a-Pic-schema file for the demo), makes sure
the base model exists, runs :func:`pipelines.latent_cache.build_cache` on Ray and writes
``<workdir>/cache_summary.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from prefopt_core.config import RunConfig

logger = logging.getLogger(__name__)


def resolve_data_source(cfg: RunConfig) -> str:
    """``data.source``, or the synthetic demo source (written once under ``<workdir>/data``)."""
    if cfg.data.source:
        return cfg.data.source
    from pipelines.synthetic import write_synthetic_pickapic

    syn = cfg.data.synthetic
    path = cfg.workdir / "data" / f"synthetic-seed{cfg.run.seed}-n{syn.num_pairs}-s{syn.image_size}.parquet"
    if not path.exists():
        write_synthetic_pickapic(
            path,
            num_pairs=syn.num_pairs,
            seed=cfg.run.seed,
            image_size=syn.image_size,
            tie_fraction=syn.tie_fraction,
        )
    return str(path)


def cache_settings(cfg: RunConfig, base_model_dir: Path):
    from pipelines.cache_format import CacheSettings

    return CacheSettings(
        family=cfg.model.family,
        pretrained=str(base_model_dir),
        resolution=cfg.model.resolution,
        dtype=cfg.model.dtype,
        max_sequence_length=cfg.model.max_sequence_length,
        prediction_type=cfg.model.prediction_type,
        crop=cfg.data.crop,
        random_flip=cfg.data.random_flip,
        tie_policy=cfg.data.tie_policy,
        max_image_pixels=cfg.data.max_image_pixels,
        max_caption_chars=cfg.data.max_caption_chars,
        seed=cfg.run.seed,
        batch_size=cfg.cache.batch_size,
        micro_conditioning=cfg.model.micro_conditioning,
        precompute=precompute_settings(cfg),
    )


def precompute_settings(cfg: RunConfig) -> dict | None:
    """What the cached reference errors depend on (``reference.strategy=precomputed``), else None."""
    if cfg.reference.strategy != "precomputed":
        return None
    return {
        "epochs": cfg.reference.precompute_epochs,
        **asdict(cfg.timestep_config()),
        "reference": cfg.model.init_denoiser,
    }


def run_cache(cfg: RunConfig) -> dict:
    from pipelines.base_model import prepare_base_model
    from pipelines.latent_cache import build_cache
    from ray_jobs.cluster import ensure_ray

    ensure_ray(cfg)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base = prepare_base_model(cfg)
    source = resolve_data_source(cfg)
    manifest = build_cache(
        source=source,
        cache_dir=cfg.cache_dir,
        base_model_dir=base,
        settings=cache_settings(cfg, base),
        num_actors=cfg.cache.num_actors,
        cpus_per_actor=cfg.cache.cpus_per_actor,
        rows_per_shard=cfg.cache.rows_per_shard,
        split=cfg.data.split,
        max_pairs=cfg.data.max_pairs,
    )
    summary = {
        "cache_dir": str(cfg.cache_dir),
        "source": source,
        "base_model_dir": str(base),
        "num_pairs": manifest["num_pairs"],
        "num_quarantined": manifest["num_quarantined"],
        "quarantine": manifest["quarantine"],
        "rows_per_s": manifest["rows_per_s"],
        "fingerprint_hash": manifest["fingerprint_hash"],
    }
    (cfg.workdir / "cache_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
