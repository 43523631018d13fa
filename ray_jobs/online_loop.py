"""``prefopt online CONFIG``: rounds of sample -> score -> pair -> train -> evaluate. Also ``python -m
ray_jobs.online_loop``.

    prefopt online configs/online_toy.yaml
    prefopt online configs/online_toy.yaml online.rounds=3 online.min_margin=0.02

Round ``r`` (``online.rounds`` of them), under ``<workdir>/online/round_{r:03d}/``:

1. **pairs** — :func:`pipelines.online.generate_online_cache` samples ``online.samples_per_prompt`` images
   per prompt from the current policy (round 0: ``model.init_denoiser``, else the base model; round r+1:
   the export of round r), scores them with ``online.scorer`` and writes best-vs-worst pairs as a latent
   cache in ``cache/`` (resumable per chunk).
2. **train** — :func:`ray_jobs.training.driver.run_training` on that cache for ``online.steps_per_round`` steps, with
   the config's loss and reference strategy, ``model.init_denoiser`` = the policy the pairs came from (so
   the policy *and* a frozen/periodic reference start from it: the reference of round r+1 is the policy at
   the start of round r+1), ``run.name = <name>-r{r}``, its own ``ray_results/`` and ``export/``.
3. **eval** — :func:`ray_jobs.evaluate.run_eval` of the round's export (model name ``policy``) against the
   base pipeline, with the ``eval`` section (prompts, seeds, scorers), into ``eval/``.

MLflow: one parent run ``<name>`` (tag ``prefopt.command=online``); per round a nested run
``<name>-round{r}`` (tags ``prefopt.command=online``, ``prefopt.round``) holding the round's metrics, with
the round's training run ``<name>-r{r}`` and eval run ``<name>-r{r}-eval`` nested under it. Per-round metrics (on the round run at step 0, on the parent at step ``r``):
``online/pairs_kept``, ``online/pairs_skipped``, ``online/score_chosen_mean``, ``online/score_rejected_mean``,
``online/margin_mean``, ``online/score_mean`` (all samples), ``train/<final metric>``, and per eval scorer
``eval/<scorer>/{win_rate,adoption_rate,mean,base_mean}``. A finished round leaves ``round_summary.json``;
a rerun of the same command skips finished rounds and resumes an interrupted one (cache chunks,
training checkpoints), so rounds can also be added later with a larger ``online.rounds``.
Returns (and writes to ``<workdir>/online_summary.json``) the summary: per-round cache dirs, exports,
run ids and metrics.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefopt_core.config import ConfigError, RunConfig, config_from_dict, flatten
from ray_jobs.online_common import POLICY_NAME, eval_config, eval_metrics, online_settings, resolve_prompts

__all__ = ["POLICY_NAME", "eval_config", "eval_metrics", "online_settings", "resolve_prompts", "run_online"]

logger = logging.getLogger(__name__)

ROUND_SUMMARY = "round_summary.json"
#: Top-level final training metrics copied into the round's metrics as ``train/<key>``.
TRAIN_METRICS = ("loss", "implicit_acc", "reward_margin", "kl/policy_init", "ref/updates")
#: Config keys that may change between reruns without invalidating finished rounds.
RERUN_SAFE_KEYS = frozenset(
    {"online.rounds", "ray.address", "ray.num_cpus", "ray.include_dashboard", "train.resume"}
)


@dataclass(frozen=True)
class RoundPaths:
    """Where round ``r`` of a run keeps everything (its own workdir)."""

    root: Path

    @classmethod
    def of(cls, cfg: RunConfig, round_index: int) -> RoundPaths:
        return cls(cfg.workdir / "online" / f"round_{round_index:03d}")

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def summary(self) -> Path:
        return self.root / ROUND_SUMMARY


# ------------------------------------------------------------------------------------------- configs
def round_config(cfg: RunConfig, round_index: int, base: Path, policy: str | None) -> RunConfig:
    """The training config of round ``round_index``: ``policy`` (a denoiser dir, None = base) as
    ``model.init_denoiser``, ``online.steps_per_round`` steps, the round's own name, workdir and cache, the
    parent's tracking store, always exported (the next round samples from the export)."""
    paths = RoundPaths.of(cfg, round_index)
    data = cfg.to_dict()
    data["run"].update(name=f"{cfg.run.name}-r{round_index}", workdir=str(paths.root))
    data["model"].update(pretrained=str(base), init_denoiser=policy)
    data["cache"]["dir"] = str(paths.cache)
    data["train"].update(max_steps=cfg.online.steps_per_round, export=True)
    data["tracking"]["uri"] = cfg.tracking_uri  # one store for the parent and every round
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"the training config of online round {round_index} is invalid: {err}") from None


# ------------------------------------------------------------------------------------------- metrics
def pair_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """``online/*`` metrics of a round's cache manifest (means over nothing are left out)."""
    o = manifest["online"]
    out = {"online/pairs_kept": float(o["pairs_kept"]), "online/pairs_skipped": float(o["pairs_skipped"])}
    for key in ("score_chosen_mean", "score_rejected_mean", "margin_mean", "score_mean"):
        if o.get(key) is not None:
            out[f"online/{key}"] = float(o[key])
    return out


def train_metrics(final: dict[str, float]) -> dict[str, float]:
    return {f"train/{k}": float(final[k]) for k in TRAIN_METRICS if k in final and math.isfinite(final[k])}


# ------------------------------------------------------------------------------------------- tracking
def _open_run(cfg: RunConfig, run_key: str, run_name: str, tags: dict[str, str], parent: str | None):
    """Find or create a run; ``None`` (with a warning) when MLflow is unreachable: tracking is never fatal."""
    from ray_jobs import tracking

    try:
        run_id, _ = tracking.find_or_create_run(
            cfg.tracking_uri, cfg.tracking.experiment, run_key, run_name, tags, parent_run_id=parent
        )
        return run_id
    except Exception as exc:
        logger.warning(
            "MLflow at %s unreachable (%s): run %s is not tracked", cfg.tracking_uri, exc, run_name
        )
        return None


def _nest(uri: str, run_id: str | None, parent: str | None, tags: dict[str, str]) -> None:
    """Make ``run_id`` a child of ``parent`` (``mlflow.parentRunId``) and tag it; best effort."""
    if run_id is None or parent is None:
        return
    from ray_jobs.tracking import mlflow_client

    try:
        client = mlflow_client(uri)
        for key, value in {"mlflow.parentRunId": parent, **tags}.items():
            client.set_tag(run_id, key, value)
    except Exception as exc:
        logger.warning("could not nest MLflow run %s under %s: %s", run_id, parent, exc)


# ------------------------------------------------------------------------------------------- rounds
@dataclass
class RoundResult:
    """What one round produced (``round_summary.json``)."""

    round: int
    policy: str | None  # the denoiser the pairs were sampled from and training started from (None: base)
    cache_dir: str
    export_dir: str
    mlflow_run_id: str | None
    train_run_id: str | None
    eval_run_id: str | None
    metrics: dict[str, float]
    config: dict[str, Any]  # the round's training config (finished rounds are checked against it)


def load_finished_round(rcfg: RunConfig, paths: RoundPaths) -> RoundResult | None:
    """The summary of a finished round, or None; a round finished with another config is refused."""
    if not paths.summary.exists():
        return None
    done = RoundResult(**json.loads(paths.summary.read_text()))
    old, new = flatten(done.config), flatten(rcfg.to_dict())
    diff = sorted(k for k in set(old) | set(new) if k not in RERUN_SAFE_KEYS and old.get(k) != new.get(k))
    if diff:
        raise ConfigError(
            f"online round {done.round} in {paths.root} finished with another config (differs in: "
            f"{', '.join(diff)}); use another run.workdir or delete {paths.root} and the rounds after it"
        )
    if not (Path(done.export_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"online round {done.round} is marked finished but {done.export_dir} is missing"
        )
    return done


def run_round(
    cfg: RunConfig, round_index: int, base: Path, policy: str | None, prompts: list[str], parent: str | None
) -> RoundResult:
    """Pairs from ``policy`` -> train -> eval, as a nested MLflow run; writes ``round_summary.json`` last."""
    from pipelines.online import generate_online_cache
    from pipelines.sharded_build import atomic_write_json
    from ray_jobs import tracking
    from ray_jobs.evaluate import run_eval
    from ray_jobs.training.driver import run_training, tracking_run_key

    uri = cfg.tracking_uri
    rcfg = round_config(cfg, round_index, base, policy)
    paths = RoundPaths.of(cfg, round_index)
    tags = {
        "prefopt.command": "online",
        "prefopt.round": str(round_index),
        "prefopt.family": cfg.model.family,
    }
    run_key = f"{tracking_run_key(cfg)}#online-r{round_index}"
    run_id = _open_run(cfg, run_key, f"{cfg.run.name}-round{round_index}", tags, parent)
    try:
        manifest = generate_online_cache(
            prompts,
            cache_dir=paths.cache,
            settings=online_settings(cfg, base, policy, round_index),
            num_actors=cfg.online.num_actors,
            cpus_per_actor=cfg.online.cpus_per_actor,
        )
        needed = rcfg.train.batch_size * rcfg.train.num_workers
        if manifest["num_pairs"] < needed:
            raise ValueError(
                f"online round {round_index} kept {manifest['num_pairs']} pairs ({manifest['skipped']} skipped), "
                f"fewer than one training batch per worker ({rcfg.train.batch_size} x {rcfg.train.num_workers}); "
                "lower online.min_margin or raise online.samples_per_prompt / online.num_prompts"
            )
        train = run_training(rcfg, parent_run_id=run_id)
        assert train.export_dir is not None  # round_config forces train.export
        ev = run_eval(eval_config(rcfg, train.export_dir, base))
        _nest(uri, ev["mlflow_run_id"], run_id, {"prefopt.round": str(round_index)})
        metrics = {
            **pair_metrics(manifest),
            **train_metrics(train.final_metrics),
            **eval_metrics(ev["metrics"]),
        }
        if run_id is not None:
            tracking.log_metrics(uri, run_id, metrics, step=0)
            tracking.log_artifact(uri, run_id, paths.cache / "manifest.json", "online")
    except BaseException:
        if run_id is not None:
            tracking.set_terminated(uri, run_id, "FAILED")
        raise
    if run_id is not None:
        tracking.set_terminated(uri, run_id, "FINISHED")
    result = RoundResult(
        round=round_index,
        policy=policy,
        cache_dir=str(paths.cache),
        export_dir=train.export_dir,
        mlflow_run_id=run_id,
        train_run_id=train.mlflow_run_id,
        eval_run_id=ev["mlflow_run_id"],
        metrics=metrics,
        config=rcfg.to_dict(),
    )
    atomic_write_json(asdict(result), paths.summary)
    logger.info("online round %d done: %s", round_index, metrics)
    return result


def run_online(cfg: RunConfig) -> dict[str, Any]:
    """Run (or finish) ``online.rounds`` rounds, or with ``online.mode=streaming`` one streaming run
    (:mod:`ray_jobs.online_streaming`); returns (and writes) the summary."""
    if cfg.online.mode == "streaming":
        from ray_jobs.online_streaming import run_streaming

        return run_streaming(cfg)
    from pipelines.base_model import prepare_base_model
    from ray_jobs import tracking
    from ray_jobs.cluster import ensure_ray
    from ray_jobs.training.driver import tracking_run_key

    prompts = resolve_prompts(cfg)
    ensure_ray(cfg)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base = prepare_base_model(cfg)
    uri = cfg.tracking_uri
    tags = {"prefopt.command": "online", "prefopt.family": cfg.model.family, "prefopt.loss": cfg.loss.name}
    parent = _open_run(cfg, f"{tracking_run_key(cfg)}#online", cfg.run.name, tags, None)
    if parent is not None:
        tracking.log_params_once(uri, parent, flatten(cfg.to_dict()))
    policy = cfg.model.init_denoiser
    rounds: list[RoundResult] = []
    try:
        for r in range(cfg.online.rounds):
            done = load_finished_round(round_config(cfg, r, base, policy), RoundPaths.of(cfg, r))
            if done is not None:
                logger.info("online round %d already finished (%s): skipping", r, done.export_dir)
                result = done
            else:
                result = run_round(cfg, r, base, policy, prompts, parent)
                if parent is not None:
                    tracking.log_metrics(uri, parent, result.metrics, step=r)
            rounds.append(result)
            policy = result.export_dir
    except BaseException:
        if parent is not None:
            tracking.set_terminated(uri, parent, "FAILED")
        raise
    if parent is not None:
        tracking.set_terminated(uri, parent, "FINISHED")
    summary = {
        "mlflow_tracking_uri": uri,
        "mlflow_run_id": parent,
        "rounds": len(rounds),
        "num_prompts": len(prompts),
        "base_model_dir": str(base),
        "final_export": rounds[-1].export_dir,
        "cache_dirs": [r.cache_dir for r in rounds],
        "exports": [r.export_dir for r in rounds],
        "round_run_ids": [r.mlflow_run_id for r in rounds],
        "metrics": {f"r{r.round}/{k}": v for r in rounds for k, v in r.metrics.items()},
    }
    (cfg.workdir / "online_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
