"""The DeepSpeed config of a run: ZeRO buffers sized from the denoiser, ``train.deepspeed`` merged on top,
and a wrong key rejected by DeepSpeed's own config model (no Ray, no engine)."""

from __future__ import annotations

import json

import pytest

from prefopt_core.config import ConfigError, load_config
from ray_jobs.training.deepspeed_config import (
    ModelSize,
    denoiser_config,
    ds_config,
    hidden_size,
    policy_stage,
    sized_zero,
    validate_deepspeed,
)


def test_sized_zero_follows_the_hidden_size_rule():
    """h = 1536, P = 2e9 (SD3-medium): h² = 2 359 296; 0.9·h² = 2 123 366 (floor); 10·h = 15 360; live and
    reuse distance P // 10 = 2e8 (between h² and DeepSpeed's 1e9)."""
    z = sized_zero(ModelSize(hidden=1536, params=2_000_000_000))
    assert z["reduce_bucket_size"] == 2_359_296
    assert z["allgather_bucket_size"] == 2_359_296
    assert z["stage3_prefetch_bucket_size"] == 2_123_366
    assert z["stage3_param_persistence_threshold"] == 15_360
    assert z["stage3_max_live_parameters"] == 200_000_000
    assert z["stage3_max_reuse_distance"] == 200_000_000


def test_live_parameters_never_below_one_bucket_nor_above_the_deepspeed_default():
    """h = 512, P = 1e6: P // 10 = 1e5 < h² = 262 144, so h²; h = 64, P = 1e11: P // 10 = 1e10 > 1e9, so 1e9."""
    assert sized_zero(ModelSize(512, 1_000_000))["stage3_max_live_parameters"] == 262_144
    assert sized_zero(ModelSize(64, 10**11))["stage3_max_live_parameters"] == 10**9


def test_hidden_size_of_an_mmdit_and_of_a_unet():
    """MMDiT: 24 heads × 64 = 1536; UNet: the widest of (320, 640, 1280) = 1280."""
    assert hidden_size({"num_attention_heads": 24, "attention_head_dim": 64}) == 1536
    assert hidden_size({"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20]}) == 1280


def test_denoiser_config_is_read_from_the_pipeline_directory(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "X"]}))
    (tmp_path / "transformer/config.json").write_text(json.dumps({"num_attention_heads": 3}))
    assert denoiser_config(tmp_path) == {"num_attention_heads": 3}


def test_user_mapping_is_deep_merged_over_the_sized_config():
    """The user's overlap_comm joins the zero section; its reduce_bucket_size (1000) beats the derived
    h² = 65 536; the stage (from train.zero_stage=2) and the derived prefetch bucket 0.9·256² = 58 982 stay."""
    cfg = load_config(
        None,
        [
            "train.zero_stage=2",
            "train.deepspeed={zero_optimization: {overlap_comm: false, reduce_bucket_size: 1000}}",
        ],
    )
    zero = ds_config(cfg, 2, size=ModelSize(hidden=256, params=9_000_000))["zero_optimization"]
    assert zero["overlap_comm"] is False
    assert zero["reduce_bucket_size"] == 1000
    assert zero["stage"] == 2
    assert zero["stage3_prefetch_bucket_size"] == 58_982


def test_unknown_zero_key_fails_naming_it():
    cfg = load_config(None, ["train.deepspeed={zero_optimization: {reduce_bucket_sise: 1000}}"])
    with pytest.raises(ConfigError, match=r"train\.deepspeed\.zero_optimization\.reduce_bucket_sise"):
        validate_deepspeed(cfg)


def test_wrong_value_type_fails_naming_the_key():
    cfg = load_config(None, ["train.deepspeed={zero_optimization: {overlap_comm: maybe}}"])
    with pytest.raises(ConfigError, match=r"train\.deepspeed\.zero_optimization\.overlap_comm"):
        validate_deepspeed(cfg)


def test_unknown_top_level_key_fails_naming_it():
    cfg = load_config(None, ["train.deepspeed={zero_optimisation: {}}"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.deepspeed\.zero_optimisation'"):
        validate_deepspeed(cfg)


def test_a_key_prefopt_owns_points_to_the_prefopt_key():
    cfg = load_config(None, ["train.deepspeed={zero_optimization: {stage: 3}}"])
    with pytest.raises(ConfigError, match=r"use train\.zero_stage instead"):
        validate_deepspeed(cfg)


def test_valid_mapping_passes_and_is_merged():
    cfg = load_config(None, ["train.deepspeed={zero_optimization: {overlap_comm: false}}"])
    assert validate_deepspeed(cfg)["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize(
    ("stage", "workers", "offload", "expected"),
    [
        (2, 1, False, 0),  # one rank: the partition is everything, so ZeRO-2 saves nothing
        (1, 1, False, 0),
        (2, 2, False, 2),  # two ranks partition
        (2, 1, True, 2),  # optimizer offload needs ZeRO
        (3, 1, False, 3),  # stage 3 keeps its own paths
        (0, 1, False, 0),
    ],
)
def test_policy_stage_on_one_worker(stage, workers, offload, expected):
    overrides = [f"train.zero_stage={stage}", f"train.offload_optimizer={str(offload).lower()}"]
    cfg = load_config(None, overrides)
    assert policy_stage(cfg, workers) == expected
    assert ds_config(cfg, workers)["zero_optimization"]["stage"] == expected
