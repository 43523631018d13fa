"""The run schema: defaults, overrides, loud errors for unknown keys and invalid combinations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from prefopt_core.config import ConfigError, RunConfig, apply_overrides, flatten, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_overrides_are_parsed_as_yaml_scalars():
    """``train.max_steps=7`` sets an int, ``reference.delta=.inf`` a float infinity, a new nested key a dict."""
    data = apply_overrides({}, ["train.max_steps=7", "reference.delta=.inf", "run.name=x y"])
    assert data == {"train": {"max_steps": 7}, "reference": {"delta": math.inf}, "run": {"name": "x y"}}
    cfg = load_config(None, ["train.max_steps=7", "reference.delta=.inf"])
    assert cfg.train.max_steps == 7 and cfg.reference.delta == math.inf


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.max_stepz=3"])
    msg = str(err.value)
    assert "train.max_stepz" in msg and "max_steps" in msg and "zero_stage" in msg


def test_unknown_literal_lists_valid_options():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["loss.name=ipo"])
    assert "dpo" in str(err.value) and "mapo" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["loss.name=mapo"], "reference-free"),
        (["loss.name=mapo", "reference.strategy=periodic"], "reference-free"),
        (["loss.name=dpo", "reference.strategy=none"], "cannot be 'none'"),
        (
            ["loss.name=sft", "reference.strategy=none", "loss.timestep_weight=inv_sqrt_snr"],
            "implicit reward",
        ),
        (["model.lora_rank=4", "reference.strategy=periodic"], "adapters disabled"),
        (["train.offload_param=true", "train.zero_stage=2"], "zero_stage=3"),
        (["train.fail_at_step=50", "train.max_steps=10"], "never fire"),
        (["model.prediction_type=v_prediction"], "sd3 is flow matching"),
    ],
)
def test_invalid_combinations_fail_with_a_reason(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


def test_derived_defaults(tmp_path, monkeypatch):
    """Paths derive from run.workdir; MLflow defaults to sqlite in the workdir unless the env says otherwise."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"run.workdir={tmp_path}"])
    assert cfg.cache_dir == tmp_path / "cache"
    assert cfg.base_model_dir == tmp_path / "base_model" and cfg.tiny_preset == "test"
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri == "http://127.0.0.1:5000"
    assert cfg.timestep_sampling == "logit_normal"
    assert load_config(None, ["model.family=sd15"]).timestep_sampling == "uniform"
    assert cfg.loss.resolved_beta() == 5000.0


@pytest.mark.parametrize(
    ("loss", "strategy", "beta"),
    [("dpo", "frozen", 5000.0), ("mapo", "none", 0.1), ("kto", "frozen", 1000.0), ("sft", "none", 0.0)],
)
def test_default_beta_is_the_losses_default(loss, strategy, beta):
    """Without loss.beta a run uses prefopt_core.losses.DEFAULT_BETA (values and sources pinned in
    test_losses.test_default_beta_per_loss), and loss_kwargs passes exactly that beta to the loss."""
    from prefopt_core.losses import loss_kwargs
    from prefopt_core.timesteps import NoiseSchedule

    cfg = load_config(None, [f"loss.name={loss}", f"reference.strategy={strategy}"])
    assert cfg.loss.resolved_beta() == beta
    schedule = NoiseSchedule(kind="flow", table=torch.linspace(0.001, 1.0, 1000, dtype=torch.float64))
    assert loss_kwargs(cfg.loss, schedule).get("beta", 0.0) == beta


def test_loss_kwargs_take_the_loss_parameters_and_the_schedule_length():
    """MaPO gets beta, snr_value and T = the schedule's length (here 7, not the usual 1000); dpo gets beta
    and convention only."""
    from prefopt_core.losses import loss_kwargs
    from prefopt_core.timesteps import NoiseSchedule

    schedule = NoiseSchedule(kind="flow", table=torch.linspace(0.1, 1.0, 7, dtype=torch.float64))
    mapo = load_config(None, ["loss.name=mapo", "reference.strategy=none", "loss.snr_value=0.25"])
    assert loss_kwargs(mapo.loss, schedule) == {"beta": 0.1, "snr_value": 0.25, "num_train_timesteps": 7}
    dpo = load_config(None, ["loss.beta=2500", "loss.convention=diffusers"])
    assert loss_kwargs(dpo.loss, schedule) == {"beta": 2500.0, "convention": "diffusers"}


@pytest.mark.parametrize("how", ["override", "file"])
def test_renamed_key_fails_naming_the_new_one(how, tmp_path):
    """timesteps.reward_scale is now loss.timestep_weight: one sentence that names the new key."""
    path = None
    overrides = ["timesteps.reward_scale=true"]
    if how == "file":
        path = tmp_path / "old.yaml"
        path.write_text("timesteps:\n  reward_scale: true\n")
        overrides = []
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "'timesteps.reward_scale' was renamed to 'loss.timestep_weight'" in message
    assert "true is now inv_sqrt_snr" in message and "\n" not in message


def test_timestep_config_of_a_run():
    """The sampling fields of the config, with the family's default sampling resolved (sd15: uniform)."""
    from prefopt_core.timesteps import TimestepConfig

    cfg = load_config(None, ["model.family=sd15", "timesteps.gamma=0.8", "timesteps.bins=10"])
    assert cfg.timestep_config() == TimestepConfig(sampling="uniform", gamma=0.8, bins=10)


def test_flatten_is_dotted():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": []}) == {"a.b": 1, "a.c.d": 2, "e": []}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    """Every YAML in configs/ is valid against the schema (real-run configs included)."""
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(RunConfig.model_fields)


def test_toy_base_needs_sd3_and_its_16_token_window(tmp_path):
    """``model.pretrained=toy-base`` lives in ``<workdir>/base_model``; its text encoders read 16 tokens, so
    any other ``max_sequence_length`` (here the schema default 256) or family is refused with the fix."""
    cfg = load_config(
        None, [f"run.workdir={tmp_path}", "model.pretrained=toy-base", "model.max_sequence_length=16"]
    )
    assert cfg.base_model_dir == tmp_path / "base_model" and cfg.tiny_preset is None
    with pytest.raises(ConfigError, match="max_sequence_length=16"):
        load_config(None, ["model.pretrained=toy-base"])
    with pytest.raises(ConfigError, match="family=sd3"):
        load_config(None, ["model.pretrained=toy-base", "model.max_sequence_length=16", "model.family=sdxl"])
