"""What both modes of ``prefopt online`` share: the prompts, the sampling settings, the evaluation of a
policy against the base model and its metric names."""

from __future__ import annotations

from pathlib import Path

from prefopt_core.config import RunConfig, config_from_dict

#: Name of the policy in its evaluation (metric keys ``eval/policy/<scorer>/...``).
POLICY_NAME = "policy"


def resolve_prompts(cfg: RunConfig) -> list[str]:
    """``online.prompts`` (text file or parquet ``caption``), else the toy-world captions; the first
    ``online.num_prompts``."""
    from pipelines.prompts import load_prompts, toy_world_prompts

    o = cfg.online
    if o.prompts:
        return load_prompts(Path(o.prompts).expanduser(), o.num_prompts)
    return toy_world_prompts()[: o.num_prompts]


def online_settings(cfg: RunConfig, base: Path, policy: str | None, round_index: int):
    """The :class:`pipelines.online.OnlineSettings` of round ``round_index`` sampling from ``policy``."""
    from pipelines.online import OnlineSettings

    o = cfg.online
    return OnlineSettings(
        family=cfg.model.family,
        base_model_dir=str(base),
        policy=policy,
        round=round_index,
        resolution=cfg.model.resolution,
        samples_per_prompt=o.samples_per_prompt,
        min_margin=o.min_margin,
        num_inference_steps=o.num_inference_steps,
        guidance_scale=o.guidance_scale,
        seed=cfg.run.seed,
        scorer=dict(o.scorer),
        dtype=cfg.model.dtype,
        max_sequence_length=cfg.model.max_sequence_length,
        prediction_type=cfg.model.prediction_type,
        micro_conditioning=cfg.model.micro_conditioning,
        batch_size=o.batch_size,
        rows_per_shard=o.rows_per_shard,
    )


def eval_config(rcfg: RunConfig, export: str, base: Path) -> RunConfig:
    """The eval config of a round: its export (named ``policy``) against the base pipeline."""
    data = rcfg.to_dict()
    data["eval"].update(models=[f"{POLICY_NAME}={export}"], baseline=str(base))
    return config_from_dict(data)


def eval_metrics(flat: dict[str, float]) -> dict[str, float]:
    """``eval/policy/<scorer>/<stat>`` and ``eval/base/<scorer>/mean`` (``run_eval``'s keys) ->
    ``eval/<scorer>/{win_rate,adoption_rate,mean,std,base_mean}`` (``std``: over the evaluated samples)."""
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) != 4 or parts[0] != "eval":
            continue
        _, model, scorer, stat = parts
        if model == POLICY_NAME and stat in ("win_rate", "adoption_rate", "mean", "std"):
            out[f"eval/{scorer}/{stat}"] = float(value)
        elif model != POLICY_NAME and stat == "mean":
            out[f"eval/{scorer}/base_mean"] = float(value)
    return out
