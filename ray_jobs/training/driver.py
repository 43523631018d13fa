"""The driver of ``prefopt train``: checks the latent cache against the model, opens (or resumes) the MLflow
run, builds a ``TorchTrainer`` whose workers run :mod:`ray_jobs.training.recipe` on the cache, relays their
progress to the console, and writes ``<workdir>/train_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.base_model import prepare_base_model
from prefopt_core.config import ConfigError, RunConfig, flatten
from ray_jobs.training import recipe as recipe_module
from ray_jobs.training.state import RecipeInputs

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    mlflow_tracking_uri: str
    mlflow_run_id: str | None
    export_dir: str | None
    checkpoint: str | None
    final_metrics: dict[str, float]
    resumed_run: bool
    num_pairs: int
    num_quarantined: int


def tracking_run_key(cfg: RunConfig) -> str:
    """The tag that finds a training run's MLflow run again on resume: ``<run.name>@<run.workdir>``."""
    return f"{cfg.run.name}@{cfg.workdir}"


def open_tracking_run(cfg: RunConfig, manifest: dict, parent_run_id: str | None):
    """Find (resume) or create the MLflow run of this training run and log its config and inputs.

    Returns ``(identity, run_id, resumed)``. An unreachable tracking server does not stop training:
    ``run_id`` is then ``None`` and rank 0 creates the run as soon as the server answers, or spills the
    metrics to ``<workdir>/mlflow_pending.jsonl`` for ``python -m ray_jobs.tracking replay``.
    """
    from ray_jobs import tracking

    uri, workdir = cfg.tracking_uri, cfg.workdir
    run_key = tracking_run_key(cfg)
    tags = {"prefopt.command": "train", "prefopt.family": cfg.model.family, "prefopt.loss": cfg.loss.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    identity = tracking.RunIdentity(cfg.tracking.experiment, run_key, cfg.run.name, tags)
    resolved = json.dumps(cfg.to_dict(), indent=1)
    (workdir / "resolved_config.json").write_text(resolved)
    local_config = cfg.scratch_dir / "resolved_config.json"  # MLflow logs artifacts from local files
    if not workdir.is_local:
        local_config.parent.mkdir(parents=True, exist_ok=True)
        local_config.write_text(resolved)
    try:
        run_id, resumed = tracking.find_or_create_run(
            uri, cfg.tracking.experiment, run_key, cfg.run.name, tags
        )
        if cfg.train.resume == "never" and resumed:
            tracking.set_terminated(uri, run_id, "KILLED")
            identity = tracking.RunIdentity(
                cfg.tracking.experiment, f"{run_key}#{int(time.time())}", cfg.run.name, tags
            )
            run_id, resumed = tracking.find_or_create_run(
                uri, identity.experiment, identity.run_key, cfg.run.name, tags
            )
        tracking.log_params_once(uri, run_id, flatten(cfg.to_dict()))
        tracking.log_cache_input(uri, run_id, manifest, cfg.cache_dir)
        tracking.log_artifact(uri, run_id, local_config)
        return identity, run_id, resumed
    except Exception as exc:
        logger.warning(
            "MLflow at %s is unreachable (%s): training goes on; metrics will be sent when it "
            "answers or spilled to %s",
            uri,
            exc,
            cfg.scratch_dir / "mlflow_pending.jsonl",
        )
        return identity, None, False


def epochs_needed(cfg: RunConfig, num_pairs: int) -> int:
    """Passes over the data a run makes: each worker gets ``num_pairs // workers`` pairs (equal split) in
    ``// batch_size`` full micro-batches; the run consumes ``max_steps * grad_accum`` micro-batches."""
    t = cfg.train
    per_epoch = (num_pairs // t.num_workers) // t.batch_size
    if per_epoch == 0:
        raise ValueError(f"{num_pairs} pairs give worker batches of fewer than {t.batch_size} pairs")
    return math.ceil(t.max_steps * t.grad_accum / per_epoch)


def check_precomputed(cfg: RunConfig, manifest: dict) -> None:
    """A precomputed-reference run needs a cache whose reference errors were drawn exactly as this run
    draws noise and timesteps, for every epoch it will reach."""
    from ray_jobs.cache import precompute_settings

    cached = manifest["fingerprint"]["settings"].get("precompute")
    wanted = precompute_settings(cfg)
    if cached is None:
        raise ConfigError(
            "reference.strategy=precomputed but the cache holds no reference errors; rebuild it with "
            "`prefopt cache CONFIG reference.strategy=precomputed cache.dir=<new dir>`"
        )
    differs = sorted(k for k in wanted if k != "epochs" and cached.get(k) != wanted[k])
    if differs or manifest["fingerprint"]["settings"]["seed"] != cfg.run.seed:
        raise ConfigError(
            f"the cache's reference errors were drawn with other settings ({', '.join(differs) or 'run.seed'}); "
            "rebuild the cache with this config"
        )
    need = epochs_needed(cfg, manifest["num_pairs"])
    if cached["epochs"] < need:
        raise ConfigError(
            f"this run reaches {need} epoch(s) but the cache holds reference errors for {cached['epochs']}; "
            f"rebuild it with reference.precompute_epochs={need}"
        )


def check_inputs(cfg: RunConfig) -> tuple[Path, dict, Any]:
    """Everything that must hold before a worker starts: the base model, a cache built for it with at
    least one batch per worker, precomputed errors that match, a checkpoint if ``resume=require``.
    Returns ``(base model dir, cache manifest, model adapter)``; what the user must fix raises
    :class:`ConfigError` (or the cache's own mismatch errors), with the fix in the message."""
    from pipelines.latent_cache import check_cache_matches, model_fingerprint, read_manifest
    from prefopt_core.models.registry import adapter_for

    base = prepare_base_model(cfg)
    manifest = read_manifest(cfg.cache_dir)
    adapter = adapter_for(cfg.model, base)
    check_cache_matches(manifest, model_fingerprint(adapter), cfg.model.resolution, cfg.cache_dir)
    if manifest["num_pairs"] < cfg.train.batch_size * cfg.train.num_workers:
        raise ConfigError(
            f"the cache holds {manifest['num_pairs']} pairs, fewer than one batch per worker "
            f"({cfg.train.batch_size} x {cfg.train.num_workers})"
        )
    if cfg.reference.strategy == "precomputed":
        check_precomputed(cfg, manifest)
    storage = cfg.workdir / "ray_results"
    if cfg.train.resume == "never" and (storage / cfg.run.name).exists():
        (storage / cfg.run.name).rmtree()
    if cfg.train.resume == "require" and not any((storage / cfg.run.name).glob("step_*")):
        raise ConfigError(
            f"train.resume=require but run {cfg.run.name!r} has no checkpoint under {storage / cfg.run.name}; "
            "check run.name and run.workdir, or use train.resume=auto to start from step 0"
        )
    return base, manifest, adapter


def make_trainer(cfg: RunConfig, loop_fn, loop_config: dict[str, Any], *, storage, dataset=None):
    """A ``TorchTrainer`` running ``loop_fn(loop_config)`` on ``train.num_workers`` workers (gloo on CPU,
    NCCL on GPUs) placed by ``train.placement_strategy``, Ray Train checkpoints under ``<storage>/<run.name>``, ``train.max_failures`` restarts,
    and, given a ``dataset``, its ordered split as the workers' ``"train"`` shard. Shared by ``prefopt
    train`` and streaming online training (whose workers read a pair buffer instead of a dataset)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_jobs.cluster import ingest_options

    t = cfg.train
    use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    data: dict[str, Any] = {}
    if dataset is not None:
        # ordered splits: every worker sees the same pairs in the same order on every (re)start, which
        # is what makes resumed runs and ZeRO stages reproduce each other
        data = {
            "datasets": {"train": dataset},
            "dataset_config": DataConfig(execution_options=ingest_options()),
        }
    return TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=t.placement_strategy,
        ),
        run_config=RayRunConfig(
            name=cfg.run.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
        ),
        **data,
    )


def build_trainer(cfg: RunConfig, inputs: RecipeInputs, dataset, progress_sink):
    """The ``TorchTrainer`` of ``prefopt train``: the worker recipe on the cache dataset."""
    return make_trainer(
        cfg,
        recipe_module.train_loop_per_worker,
        {"inputs": inputs, "progress_sink": progress_sink},
        storage=cfg.workdir / "ray_results",
        dataset=dataset,
    )


def _finish_tracking(cfg: RunConfig, identity, run_id: str | None, manifest: dict) -> str | None:
    """Log the cache counts and close the MLflow run (created by rank 0 if the server was down at start)."""
    from ray_jobs import tracking

    uri = cfg.tracking_uri
    if run_id is None:
        with contextlib.suppress(Exception):
            run_id, _ = tracking.find_or_create_run(
                uri, identity.experiment, identity.run_key, identity.run_name, identity.tags
            )
    if run_id is not None:
        counts = {"num_pairs": manifest["num_pairs"], "num_quarantined": manifest["num_quarantined"]}
        tracking.log_metrics(uri, run_id, counts, step=0)
        tracking.set_terminated(uri, run_id, "FINISHED")
    return run_id


def run_training(cfg: RunConfig, *, parent_run_id: str | None = None) -> TrainSummary:
    """Train from the latent cache on Ray; returns (and writes) the run summary."""
    from pipelines.cache_reader import cache_dataset, sample_captions
    from ray_jobs import tracking
    from ray_jobs.cluster import ensure_ray
    from ray_jobs.training.deepspeed_config import validate_deepspeed
    from ray_jobs.training.progress_relay import ProgressRelay

    validate_deepspeed(cfg)  # a wrong train.deepspeed key fails here, before Ray or any worker starts
    ensure_ray(cfg)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    base, manifest, adapter = check_inputs(cfg)
    identity, run_id, resumed = open_tracking_run(cfg, manifest, parent_run_id)
    dataset = cache_dataset(cfg.cache_dir, manifest, driver_read_max_mb=cfg.train.driver_read_max_mb)
    export_dir = cfg.workdir / "export"
    inputs = RecipeInputs(
        config=cfg,
        manifest=manifest,
        tracking_uri=cfg.tracking_uri,
        base_model_dir=str(base),
        export_dir=str(export_dir),
        run_id=run_id,
        run_identity=identity,
        probe=dataset.take_batch(cfg.reference.probe_size, batch_format="pyarrow"),
        sample_prompts=sample_captions(cfg.cache_dir, manifest, cfg.train.sample_prompts),
    )
    try:
        with ProgressRelay() as relay:
            result = build_trainer(cfg, inputs, dataset, relay.sink).fit()
    except BaseException:
        if run_id is not None:
            tracking.set_terminated(cfg.tracking_uri, run_id, "FAILED")
        raise
    run_id = _finish_tracking(cfg, identity, run_id, manifest)
    final = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    if "loss" not in final and run_id is not None:  # a finished run, rerun: no step trained this time
        try:
            final = tracking.final_metrics(cfg.tracking_uri, run_id)
        except Exception as exc:
            logger.warning("could not read the final metrics of MLflow run %s: %s", run_id, exc)
    summary = TrainSummary(
        mlflow_tracking_uri=cfg.tracking_uri,
        mlflow_run_id=run_id,
        export_dir=str(export_dir / adapter.denoiser_subfolder) if cfg.train.export else None,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        final_metrics=final,
        resumed_run=resumed,
        num_pairs=manifest["num_pairs"],
        num_quarantined=manifest["num_quarantined"],
    )
    (cfg.workdir / "train_summary.json").write_text(json.dumps(vars(summary), indent=1))  # published whole
    return summary
