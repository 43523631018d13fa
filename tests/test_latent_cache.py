"""The Ray Data latent cache: round trip, quarantine, resume after a failure, fingerprint refusal."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.latent_cache import (
    CacheMismatchError,
    build_cache,
    check_cache_matches,
    model_fingerprint,
    pair_key,
    read_manifest,
)
from pipelines.schema import make_pair_id, make_source_key, pair_rng
from pipelines.sharded_build import PlanMismatchError
from pipelines.synthetic import synthetic_rows, write_synthetic_pickapic
from pipelines.tensor_columns import from_column
from pipelines.transforms import TransformConfig, transform_pair
from prefopt_core.models.sd3 import SD3Adapter
from tests._cache import settings_for
from tests._corpus import bad_rows, good_row, write_pickapic_parquet

pytestmark = pytest.mark.slow


def read_rows(cache_dir) -> list[dict]:
    manifest = read_manifest(cache_dir)
    rows = []
    for f in manifest["files"]:
        rows.extend(pq.read_table(cache_dir / f).to_pylist())
    return rows


N_PAIRS = 14  # synthetic source shared by the round-trip, resume and mismatch tests (seed 3, 25 % ties)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, tiny_sd3, ray_cluster):
    """One uninterrupted build: 14 rows in fragments of 4 (the last one holds 2)."""
    root = tmp_path_factory.mktemp("reference_cache")
    source = write_synthetic_pickapic(
        root / "src.parquet", num_pairs=N_PAIRS, seed=3, image_size=40, tie_fraction=0.25
    )
    manifest = build_cache(
        source=str(source),
        cache_dir=root / "cache",
        base_model_dir=tiny_sd3,
        settings=settings_for(tiny_sd3),
        rows_per_shard=4,
    )
    return source, root / "cache", manifest


def test_round_trip_chosen_first_ties_dropped(reference_cache, tiny_sd3):
    """Pairs in -> rows out. The synthetic source prefers the outlined image and holds ties; derivation:
    every non-tie source row must appear exactly once with ``latents_w`` = VAE(transform(chosen image))
    where chosen is jpg_0 if label_0 == 1 else jpg_1; every tie row (label 0.5/0.5) must be quarantined
    with reason ``tie`` and nothing else is lost."""
    source, cache, manifest = reference_cache
    src_rows = synthetic_rows(N_PAIRS, seed=3, image_size=40, tie_fraction=0.25)
    ties = [i for i, r in enumerate(src_rows) if r["label_0"] == 0.5]
    assert 0 < len(ties) < N_PAIRS, "the seed must give a mix of ties and preferences"
    assert manifest["num_pairs"] == 14 - len(ties)
    assert manifest["num_quarantined"] == len(ties) and manifest["quarantine"] == {"tie": len(ties)}
    assert manifest["num_input_rows"] == 14

    key = make_source_key(source)
    rows = {r["row_index"]: r for r in read_rows(cache)}
    assert sorted(rows) == [i for i in range(14) if i not in ties]
    adapter = SD3Adapter(tiny_sd3)
    shape = manifest["columns"]["latents_w"]
    tcfg = TransformConfig(resolution=32)
    for i, row in rows.items():
        src = src_rows[i]
        chosen, rejected = (
            (src["jpg_0"], src["jpg_1"]) if src["label_0"] == 1.0 else (src["jpg_1"], src["jpg_0"])
        )
        assert row["pair_id"] == make_pair_id(key, i) and row["pair_key"] == pair_key(row["pair_id"])
        assert row["swapped"] == (src["label_0"] == 0.0)
        px = transform_pair(chosen, rejected, tcfg, pair_rng(0, row["pair_id"], "transform"))
        pixels = torch.from_numpy(np.stack([px.w, px.l]))
        quantised = torch.round((pixels + 1) * 127.5) / 127.5 - 1  # the cache carries uint8 pixels
        expected = adapter.encode_images(quantised)
        got_w = torch.from_numpy(np.array(row["latents_w"], np.float32)).view(*shape)
        got_l = torch.from_numpy(np.array(row["latents_l"], np.float32)).view(*shape)
        torch.testing.assert_close(got_w, expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_l, expected[1], atol=1e-5, rtol=1e-5)
    emb = adapter.encode_prompts([src_rows[min(rows)]["caption"]])["prompt_embeds"][0]
    got = from_column(
        pq.read_table(cache / read_manifest(cache)["files"][0])["prompt_embeds"],
        manifest["columns"]["prompt_embeds"],
    )[0]
    torch.testing.assert_close(torch.from_numpy(np.array(got)), emb, atol=1e-5, rtol=1e-5)


def test_bad_rows_quarantined_with_reasons(tmp_path, tiny_sd3, ray_cluster):
    """Every row of the bad-input corpus lands in quarantine with its reason and original bytes; every
    good row lands in the cache; the manifest counts each reason."""
    good = [good_row(i) for i in range(6)]
    bad = bad_rows()
    src = write_pickapic_parquet(
        tmp_path / "data" / "train-00000-of-00001.parquet", good + [row for row, _ in bad]
    )
    cache = tmp_path / "cache"
    manifest = build_cache(
        source=str(src),
        cache_dir=cache,
        base_model_dir=tiny_sd3,
        settings=settings_for(tiny_sd3),
        rows_per_shard=5,
    )
    assert manifest["num_pairs"] == len(good)
    q = (
        pq.read_table(cache / "quarantine").to_pylist()
        if False
        else [r for f in manifest["quarantine_files"] for r in pq.read_table(cache / f).to_pylist()]
    )
    by_row = {r["row_index"]: r for r in q}
    for j, (row, reason) in enumerate(bad):
        got = by_row[len(good) + j]
        assert got["reason"] == reason, (j, got["detail"])
        assert got["jpg_0"] == row["jpg_0"] and got["caption"] == row["caption"]
    expected_counts: dict[str, int] = {}
    for _, reason in bad:
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert manifest["quarantine"] == dict(sorted(expected_counts.items()))
    assert {r["row_index"] for r in read_rows(cache)} == set(range(len(good)))


def test_resume_after_encoder_failure_gives_identical_pairs(tmp_path, reference_cache, tiny_sd3):
    """An encoder actor that dies after its first batch leaves a partial cache with no manifest; the rerun
    skips the complete fragments, redoes the rest, and ends with exactly the pair ids (and latents) of the
    uninterrupted build: no duplicate, none missing, bit-identical latents."""
    source, ref_dir, ref = reference_cache
    settings = settings_for(tiny_sd3)  # same batch size: batched convolutions differ in the last bits
    broken = tmp_path / "broken"
    with pytest.raises(Exception, match="injected encoder failure"):
        build_cache(
            source=str(source),
            cache_dir=broken,
            base_model_dir=tiny_sd3,
            settings=settings,
            rows_per_shard=4,
            fail_after_batches=1,
        )
    assert not (broken / "manifest.json").exists()
    partial = list((broken / "shards").glob("*.parquet"))
    assert 0 < len(partial) < len(ref["files"])
    resumed = build_cache(
        source=str(source), cache_dir=broken, base_model_dir=tiny_sd3, settings=settings, rows_per_shard=4
    )
    ref_rows = sorted(read_rows(ref_dir), key=lambda r: r["pair_id"])
    new_rows = sorted(read_rows(broken), key=lambda r: r["pair_id"])
    assert [r["pair_id"] for r in new_rows] == [r["pair_id"] for r in ref_rows]
    assert len({r["pair_id"] for r in new_rows}) == len(new_rows) == ref["num_pairs"]
    for a, b in zip(ref_rows, new_rows, strict=True):
        assert a["latents_w"] == b["latents_w"]
    assert resumed["quarantine"] == ref["quarantine"]


def test_mismatched_cache_is_refused(reference_cache, tiny_sd3):
    """A cache dir is never mixed across settings, and training refuses other encoders/resolutions."""
    source, cache, manifest = reference_cache
    with pytest.raises(PlanMismatchError, match="other settings"):
        build_cache(
            source=str(source),
            cache_dir=cache,
            base_model_dir=tiny_sd3,
            settings=settings_for(tiny_sd3, "data.crop=random"),
            rows_per_shard=4,
        )
    fp = model_fingerprint(SD3Adapter(tiny_sd3))
    check_cache_matches(manifest, fp, 32, cache)  # matches: no error
    with pytest.raises(CacheMismatchError, match="prefopt cache"):
        check_cache_matches(manifest, {**fp, "encoders": {**fp["encoders"], "vae": "0" * 16}}, 32, cache)
    with pytest.raises(CacheMismatchError, match="prefopt cache"):
        check_cache_matches(manifest, {**fp, "max_sequence_length": 77}, 32, cache)
    with pytest.raises(CacheMismatchError, match="resolution"):
        check_cache_matches(manifest, fp, 64, cache)
    assert json.loads((cache / "plan.json").read_text())["fingerprint"] == manifest["fingerprint"]
