"""Builds and pre-flight checks against a real S3 API (the session's moto server on 127.0.0.1)."""

from __future__ import annotations

import time

import pytest

from pipelines.latent_cache import build_cache, read_manifest
from pipelines.sharded_build import read_parquet
from pipelines.synthetic import write_synthetic_pickapic
from prefopt_core.config import load_config
from prefopt_core.storage import Location
from ray_jobs.preflight import PreflightError, check_inputs
from tests._cache import settings_for

pytestmark = pytest.mark.slow


def _rows(cache_dir) -> list[dict]:
    root = Location(cache_dir)
    rows = [r for f in read_manifest(root)["files"] for r in read_parquet(root / f).to_pylist()]
    return sorted(rows, key=lambda r: r["pair_id"])


def test_killed_bucket_cache_build_resumes_to_the_uninterrupted_rows(
    tmp_path, s3_bucket, tiny_sd3, ray_cluster
):
    """12 synthetic pairs (seed 5) in fragments of 4, read from the bucket and encoded into it; the encoder
    dies after its first batch (one fragment of three written, no manifest). The rerun skips that fragment
    and ends with exactly the pair ids and latents of an uninterrupted local build of the same source."""
    source = write_synthetic_pickapic(f"{s3_bucket}/resume/src.parquet", num_pairs=12, seed=5, image_size=40)
    settings = settings_for(tiny_sd3, "cache.batch_size=4")
    common = dict(source=source, base_model_dir=tiny_sd3, settings=settings, rows_per_shard=4)
    local = build_cache(cache_dir=tmp_path / "local", **common)
    bucket = f"{s3_bucket}/resume/cache"
    with pytest.raises(Exception, match="injected encoder failure"):
        build_cache(cache_dir=bucket, fail_after_batches=1, **common)
    assert not Location(f"{bucket}/manifest.json").exists()
    assert 0 < len(Location(f"{bucket}/shards").glob("*.parquet")) < len(local["files"])
    resumed = build_cache(cache_dir=bucket, **common)
    assert resumed["files"] == local["files"] and resumed["num_pairs"] == local["num_pairs"]
    ref, new = _rows(tmp_path / "local"), _rows(bucket)
    assert [r["pair_id"] for r in new] == [r["pair_id"] for r in ref]
    assert all(a["latents_w"] == b["latents_w"] for a, b in zip(ref, new, strict=True))


def test_missing_bucket_fails_preflight(s3_bucket):
    """A workdir in a bucket that does not exist is refused before anything starts, naming the URI."""
    cfg = load_config(None, ["run.workdir=s3://no-such-bucket/run"])
    with pytest.raises(
        PreflightError, match=r"run.workdir s3://no-such-bucket/run: bucket .* does not exist"
    ):
        check_inputs(cfg, ["run"])


def test_unreachable_endpoint_fails_preflight_in_seconds(monkeypatch):
    """With the endpoint on a closed port, the pre-flight check fails within 30 s (the S3 client's
    retries take ~7 s) with a sentence naming the URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    cfg = load_config(None, ["run.workdir=s3://prefopt-test/run"])
    t0 = time.monotonic()
    with pytest.raises(PreflightError, match=r"run.workdir s3://prefopt-test/run cannot be reached"):
        check_inputs(cfg, ["run"])
    assert time.monotonic() - t0 < 30
