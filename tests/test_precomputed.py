"""reference.strategy=precomputed: reference errors from the cache equal a live frozen reference's."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cache_reader import batch_from_table
from pipelines.latent_cache import read_manifest
from prefopt_core.config import load_config
from prefopt_core.models.sd3 import SD3Adapter
from prefopt_core.objective import PreferenceObjective
from prefopt_core.timesteps import TimestepConfig
from ray_jobs.training.driver import check_precomputed, epochs_needed
from tests._cache import synthetic_cache

pytestmark = pytest.mark.slow
EPOCHS = 3


@pytest.fixture(scope="module")
def precomputed_cache(tmp_path_factory, tiny_sd3, ray_cluster):
    root = tmp_path_factory.mktemp("precomputed")
    overrides = (
        "reference.strategy=precomputed",
        f"reference.precompute_epochs={EPOCHS}",
        "timesteps.sampling=gamma",
        "timesteps.gamma=0.8",
        "timesteps.bins=10",
        "cache.batch_size=4",
    )
    return synthetic_cache(root, tiny_sd3, num_pairs=6, seed=4, rows_per_shard=6, overrides=overrides)


def test_precomputed_loss_equals_live_reference_loss(precomputed_cache, tiny_sd3):
    """For every epoch e < E the cache holds ref errors computed with noise/timesteps drawn from
    ``pair_seed(seed, pair_key, e)``; the trainer draws the same, so with a policy that differs from the
    reference the DPO loss from cached errors equals the loss with the live frozen reference (to float
    tolerance: the only difference is batch composition of the reference forward). Epoch E must fail."""
    cache = precomputed_cache
    manifest = read_manifest(cache)
    assert manifest["columns"]["ref_err_w"] == [EPOCHS]
    table = pq.read_table(cache / manifest["files"][0])
    cached = batch_from_table(table, manifest["columns"])
    live = batch_from_table(
        table.drop_columns(["ref_err_w", "ref_err_l"]),
        {k: v for k, v in manifest["columns"].items() if not k.startswith("ref_err")},
    )
    adapter = SD3Adapter(tiny_sd3)
    reference = adapter.load_denoiser().eval()
    policy = adapter.load_denoiser().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    objective = PreferenceObjective(
        adapter,
        loss_name="dpo",
        loss_params={"beta": 500.0},
        timesteps=TimestepConfig(sampling="gamma", gamma=0.8, bins=10),
        seed=0,
    )
    with torch.no_grad():
        for epoch in range(EPOCHS):
            a = objective(policy, cached, epoch=epoch)
            b = objective(policy, live, epoch=epoch, reference=reference)
            torch.testing.assert_close(a.loss_output.losses, b.loss_output.losses, atol=1e-6, rtol=1e-5)
            assert abs(float(a.loss) - 0.6931) > 1e-4, "policy and reference must differ for a real check"
        with pytest.raises(ValueError, match="precompute_epochs"):
            objective(policy, cached, epoch=EPOCHS)


def test_training_refuses_mismatched_or_short_precomputation(precomputed_cache):
    """6 pairs, 2 workers, batch 1 -> 3 micro-batches per epoch; 10 steps need ceil(10/3) = 4 > 3 epochs."""
    cache = precomputed_cache
    manifest = read_manifest(cache)
    base = [
        "reference.strategy=precomputed",
        f"reference.precompute_epochs={EPOCHS}",
        "timesteps.sampling=gamma",
        "timesteps.gamma=0.8",
        "timesteps.bins=10",
        "train.num_workers=2",
        "train.batch_size=1",
    ]
    ok = load_config(None, [*base, "train.max_steps=9"])
    assert epochs_needed(ok, 6) == 3
    check_precomputed(ok, manifest)
    with pytest.raises(ValueError, match="precompute_epochs=4"):
        check_precomputed(load_config(None, [*base, "train.max_steps=10"]), manifest)
    with pytest.raises(ValueError, match="gamma"):
        check_precomputed(load_config(None, [*base, "train.max_steps=9", "timesteps.gamma=0.9"]), manifest)
