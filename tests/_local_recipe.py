"""Test helper: the worker recipe of a run config in this process (no Ray), on a local latent cache."""

from __future__ import annotations

from pathlib import Path

from pipelines.cache_reader import read_cache_table
from pipelines.latent_cache import read_manifest
from ray_jobs import tracking
from ray_jobs.training.context import LocalContext
from ray_jobs.training.recipe import WorkerRecipe
from ray_jobs.training.state import RecipeInputs


def local_recipe(
    cfg, cache: Path, base_model_dir: Path, workdir: Path, *, progress_every_s: float = 5.0
) -> tuple[WorkerRecipe, LocalContext]:
    """A :class:`WorkerRecipe` of ``cfg`` on ``cache`` with a :class:`LocalContext` (checkpoints under
    ``workdir/checkpoints``) and its own MLflow run in ``cfg``'s store; ``recipe.inputs.run_id`` names it."""
    manifest = read_manifest(cache)
    identity = tracking.RunIdentity(cfg.tracking.experiment, f"local@{workdir}", "local", {})
    run_id, _ = tracking.find_or_create_run(
        cfg.tracking_uri, identity.experiment, identity.run_key, "local", {}
    )
    table = read_cache_table(cache, manifest)
    inputs = RecipeInputs(
        config=cfg,
        manifest=manifest,
        tracking_uri=cfg.tracking_uri,
        base_model_dir=str(base_model_dir),
        export_dir=str(workdir / "export"),
        run_id=run_id,
        run_identity=identity,
        probe=table.slice(0, cfg.reference.probe_size),
        progress_every_s=progress_every_s,
    )
    ctx = LocalContext(table, workdir / "checkpoints")
    return WorkerRecipe(inputs, ctx), ctx
