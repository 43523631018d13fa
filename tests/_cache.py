"""Small latent caches for tests, built through the same settings path as `prefopt cache`."""

from __future__ import annotations

from pathlib import Path

from pipelines.latent_cache import CacheSettings, build_cache
from pipelines.synthetic import write_synthetic_pickapic
from prefopt_core.config import load_config
from ray_jobs.cache import cache_settings


def settings_for(model_dir: str | Path, *overrides: str) -> CacheSettings:
    """The cache settings `prefopt cache` derives for the tiny model at ``model_dir`` (+ config overrides)."""
    cfg = load_config(None, [f"model.pretrained={model_dir}", "cache.batch_size=8", *overrides])
    return cache_settings(cfg, Path(model_dir))


def synthetic_cache(
    root: Path,
    model_dir: str | Path,
    *,
    num_pairs: int,
    seed: int,
    tie_fraction: float = 0.0,
    rows_per_shard: int = 8,
    overrides: tuple[str, ...] = (),
) -> Path:
    """A synthetic Pick-a-Pic-schema source of ``num_pairs`` (40 px images) encoded into ``root/cache``."""
    source = write_synthetic_pickapic(
        root / "src.parquet", num_pairs=num_pairs, seed=seed, image_size=40, tie_fraction=tie_fraction
    )
    build_cache(
        source=str(source),
        cache_dir=root / "cache",
        base_model_dir=model_dir,
        settings=settings_for(model_dir, *overrides),
        rows_per_shard=rows_per_shard,
    )
    return root / "cache"
