"""``prefopt eval CONFIG``: generate with the base and tuned models, score, win rates, MLflow, image grid.

    prefopt eval configs/eval_toy.yaml                         # after `prefopt demo`
    prefopt eval configs/x.yaml 'eval.models=[dpo=/w/a/export/transformer,/w/b/export]' eval.seeds=[0,1]
    python -m ray_jobs eval configs/x.yaml                     # the same

Reads ``cfg.eval``: prompts (``pipelines.evaluation.load_prompts``; default the held-out toy-world prompts),
``num_prompts``, ``seeds``, ``scorers`` (specs for ``pipelines.rewards.build_scorer``), ``models`` and
``baseline``, ``num_inference_steps``, ``guidance_scale``; images are ``model.resolution`` px.

A ``models`` entry is ``PATH`` or ``NAME=PATH``; ``PATH`` is a full diffusers pipeline directory
(``model_index.json``), an exported denoiser directory (``<workdir>/export/transformer``: ``config.json`` +
weights) or an export directory holding one (``<workdir>/export``). A denoiser is combined with the baseline
pipeline's VAE, text encoders and scheduler. The baseline (``eval.baseline``, default ``model.pretrained``,
built on demand for ``tiny``) is the model ``base``. Default names: the path without trailing
``transformer``/``unet``/``export`` parts, last component (``/w/run1/export/transformer`` -> ``run1``).

Every path may be a local path or an object-store URI (:mod:`prefopt_core.storage`): models and prompt
files in a bucket are read through a per-node local copy; with ``run.workdir`` in a bucket the grid and
``results.json`` are written to the node's scratch directory (``cfg.scratch_dir``), logged to MLflow from
there and uploaded to ``<workdir>/eval``.

Generation runs in-process (one pipeline in memory at a time, on CUDA when available); every model starts
from the same noise per seed (paired). Logs one MLflow run (tag ``prefopt.command=eval``) in
``cfg.tracking.experiment`` with metrics ``eval/<model>/<scorer>/{mean,std,win_rate,win_rate_seed_mean,
win_rate_seed_std,adoption_rate}`` and ``.../win_rate_per_seed`` (MLflow step = seed), and the grid
(``<workdir>/eval/grid.png``: rows = models, columns = prompts, first seed) and ``<workdir>/eval/results.json``
(per-sample scores) as artifacts. Returns the summary the CLI writes to ``<workdir>/eval_summary.json``.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from prefopt_core.config import ConfigError, RunConfig, flatten
from prefopt_core.storage import Location, local_path

logger = logging.getLogger(__name__)

BASELINE_NAME = "base"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """One model to evaluate: a display/metric name, a directory (local or in a bucket), and what it holds."""

    name: str
    path: Location
    kind: Literal["pipeline", "denoiser"]


# ------------------------------------------------------------------------------------------- model sources
def default_name(path: str | Path | Location, denoiser_subfolder: str) -> str:
    """``/w/run1/export/transformer`` (or ``s3://b/run1/export/transformer``) -> ``run1``: drop trailing
    denoiser/``export`` parts, keep the last one."""
    parts = [p for p in Location(path).uri.split("/") if p]
    while len(parts) > 1 and parts[-1] in {denoiser_subfolder, "transformer", "unet", "export"}:
        parts.pop()
    return parts[-1] if parts else str(path)


def sanitize_name(name: str) -> str:
    """Characters outside ``[A-Za-z0-9_.-]`` -> ``_`` (MLflow metric keys are built from names)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "model"


def resolve_source(
    entry: str, denoiser_subfolder: str
) -> tuple[str | None, Location, Literal["pipeline", "denoiser"]]:
    """``"[NAME=]PATH"`` -> ``(name or None, directory, kind)``; FileNotFoundError names the accepted layouts."""
    name, raw = None, entry
    head, sep, tail = entry.partition("=")
    if sep and tail and _NAME_RE.match(head):
        name, raw = head, tail
    path = Location(raw)
    if (path / "model_index.json").is_file():
        return name, path, "pipeline"
    if (path / "config.json").is_file():
        return name, path, "denoiser"
    if (path / denoiser_subfolder / "config.json").is_file():
        return name, path / denoiser_subfolder, "denoiser"
    raise FileNotFoundError(
        f"eval.models entry {entry!r}: {path} is neither a diffusers pipeline directory (model_index.json), an "
        f"exported denoiser directory (config.json + weights), nor an export directory holding "
        f"{denoiser_subfolder}/config.json"
    )


def resolve_models(entries: list[str], denoiser_subfolder: str) -> list[ModelSource]:
    """Sources for ``eval.models`` with unique names (``base`` is reserved; clashes get ``-2``, ``-3``, ...)."""
    used = {BASELINE_NAME}
    out = []
    for entry in entries:
        name, path, kind = resolve_source(entry, denoiser_subfolder)
        name = sanitize_name(name or default_name(path, denoiser_subfolder))
        unique, k = name, 2
        while unique in used:
            unique, k = f"{name}-{k}", k + 1
        used.add(unique)
        out.append(ModelSource(unique, path, kind))
    return out


def baseline_dir(cfg: RunConfig) -> Location:
    """``eval.baseline`` (a pipeline directory), else ``model.pretrained`` (tiny models are built on demand)."""
    if cfg.eval.baseline is None:
        from pipelines.base_model import prepare_base_model

        return prepare_base_model(cfg)
    path = Location(cfg.eval.baseline)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"eval.baseline={cfg.eval.baseline!r} is not a diffusers pipeline directory (no model_index.json)"
        )
    return path


def scorer_labels(specs: list[dict[str, Any]]) -> list[str]:
    """Metric labels of the scorer specs: their names, ``-2``, ``-3``... for repeats (two CLIP models)."""
    labels: list[str] = []
    for spec in specs:
        base = str(spec.get("name", "scorer") if isinstance(spec, dict) else spec)
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


# ------------------------------------------------------------------------------------------- metrics
def flat_metrics(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """``{model: {scorer: stats}}`` -> ``{"eval/<model>/<scorer>/<stat>": value}`` for the scalar stats."""
    return {
        f"eval/{model}/{scorer}/{key}": float(value)
        for model, per_scorer in results.items()
        for scorer, stats in per_scorer.items()
        for key, value in stats.items()
        if isinstance(value, int | float)
    }


def _log_to_mlflow(uri: str, run_id: str, results: dict, seeds: list[int], files: list[Path]) -> None:
    from ray_jobs import tracking

    tracking.log_metrics(uri, run_id, flat_metrics(results), step=0)
    for model, per_scorer in results.items():
        for scorer, stats in per_scorer.items():
            for seed, rate in zip(seeds, stats.get("win_rate_per_seed", [])):
                tracking.log_metrics(
                    uri, run_id, {f"eval/{model}/{scorer}/win_rate_per_seed": rate}, step=seed
                )
    for f in files:
        tracking.log_artifact(uri, run_id, f, "eval")


# ------------------------------------------------------------------------------------------- recipe
def load_pipeline(cfg: RunConfig, adapter, source: ModelSource | None, device: torch.device):
    """The baseline pipeline (``source=None``), a full pipeline directory, or the baseline with a denoiser."""
    from prefopt_core.models.base import TORCH_DTYPES
    from prefopt_core.models.registry import adapter_for

    dtype = TORCH_DTYPES[cfg.model.dtype]
    if source is None:
        pipe = adapter.pipeline(dtype=dtype)
    elif source.kind == "pipeline":
        pipe = adapter_for(cfg.model, source.path).pipeline(dtype=dtype)
    else:
        pipe = adapter.pipeline(adapter.load_denoiser(source.path, dtype=dtype), dtype=dtype)
    pipe.to(device)  # components were loaded in `dtype` already; a cast here would bypass keep-in-fp32 lists
    return pipe


@dataclass
class Generated:
    """Per model: ``(S, P)`` scores and detections per scorer label, and the first seed's images (the grid)."""

    scores: dict[str, dict[str, np.ndarray]]
    detections: dict[str, dict[str, np.ndarray | None]]
    first_seed: dict[str, list]


def generate_and_score(
    cfg: RunConfig, adapter, sources: list[ModelSource], prompts: list[str], scorers: dict[str, Any]
) -> Generated:
    """Generate ``prompts x cfg.eval.seeds`` with the baseline and every source (one pipeline in memory at a
    time) and score each model's images as soon as they exist."""
    from pipelines.evaluation import detect_grid, generate_images, score_grid
    from pipelines.progress import Progress

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    call_kwargs = {"max_sequence_length": cfg.model.max_sequence_length} if cfg.model.family == "sd3" else {}
    out = Generated({}, {}, {})
    models = [(BASELINE_NAME, None), *((s.name, s) for s in sources)]
    progress = Progress("eval", len(models) * len(prompts) * len(cfg.eval.seeds), unit="images")
    for name, source in models:
        logger.info("eval: generating %d prompts x %d seeds with %s", len(prompts), len(cfg.eval.seeds), name)
        pipe = load_pipeline(cfg, adapter, source, device)
        images = generate_images(
            pipe,
            prompts,
            cfg.eval.seeds,
            resolution=cfg.model.resolution,
            num_inference_steps=cfg.eval.num_inference_steps,
            guidance_scale=cfg.eval.guidance_scale,
            batch_size=cfg.eval.batch_size,
            call_kwargs=call_kwargs,
            progress=progress,
        )
        del pipe
        gc.collect()
        out.scores[name] = {label: score_grid(s, images, prompts) for label, s in scorers.items()}
        out.detections[name] = {label: detect_grid(s, images) for label, s in scorers.items()}
        out.first_seed[name] = images[0]
    progress.finish()
    return out


def write_outputs(out_dir: Path, gen: Generated, results: dict, prompts: list[str], meta: dict) -> list[Path]:
    """``grid.png`` (rows = models, columns = prompts, first seed) and ``results.json`` (per-sample scores,
    detections, stats, ``meta``) under the local directory ``out_dir``; returns both paths."""
    from pipelines.evaluation import as_jsonable, image_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / "grid.png"
    image_grid(gen.first_seed, prompts).save(grid_path)
    detections = {m: {k: v for k, v in d.items() if v is not None} for m, d in gen.detections.items()}
    payload = {**meta, "prompts": prompts, "results": results, "scores": gen.scores, "detections": detections}
    results_path = out_dir / "results.json"
    results_path.write_text(json.dumps(as_jsonable(payload), indent=1))
    return [grid_path, results_path]


def output_staging(cfg: RunConfig) -> Path:
    """The local directory the outputs are written to: ``<workdir>/eval`` itself when the workdir is local,
    else ``<scratch dir>/eval`` (uploaded to ``<workdir>/eval`` afterwards)."""
    output = cfg.workdir / "eval"
    return output.local if output.is_local else cfg.scratch_dir / "eval"


def run_eval(cfg: RunConfig) -> dict[str, Any]:
    """Evaluate ``cfg.eval.models`` against the baseline; log to MLflow; return the summary dict.

    MLflow: the run is opened first (a tracking store that cannot be reached fails the command before any
    generation); metrics and artifacts are then logged best-effort, the results being on disk either way.
    """
    from pipelines.evaluation import load_prompts, summarize
    from pipelines.rewards import build_scorer
    from prefopt_core.models.registry import adapter_for
    from ray_jobs import tracking

    seeds = list(cfg.eval.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"eval.seeds must be a non-empty list of distinct seeds, got {seeds}")
    base = baseline_dir(cfg)
    adapter = adapter_for(cfg.model, base)
    sources = resolve_models(list(cfg.eval.models), adapter.denoiser_subfolder)
    if not sources:
        logger.warning("eval.models is empty: scoring the baseline only (no win rates)")
    models = {BASELINE_NAME: str(base), **{s.name: str(s.path) for s in sources}}
    prompts = load_prompts(local_path(cfg.eval.prompts), cfg.eval.num_prompts)
    labels = scorer_labels(cfg.eval.scorers)
    scorers = dict(zip(labels, (build_scorer(spec) for spec in cfg.eval.scorers), strict=True))

    uri = cfg.tracking_uri
    run_id = _start_run(uri, cfg, base, sources, labels)
    try:
        gen = generate_and_score(cfg, adapter, sources, prompts, scorers)
        results = summarize(gen.scores, BASELINE_NAME, gen.detections)
        meta = {"seeds": seeds, "baseline": BASELINE_NAME, "models": models}
        output = cfg.workdir / "eval"
        files = write_outputs(output_staging(cfg), gen, results, prompts, meta)
        _log_to_mlflow(uri, run_id, results, seeds, files)
        if not output.is_local:
            output.upload_dir(files[0].parent)
    except BaseException:
        tracking.set_terminated(uri, run_id, "FAILED")
        raise
    tracking.set_terminated(uri, run_id, "FINISHED")
    return {
        "mlflow_tracking_uri": uri,
        "mlflow_run_id": run_id,
        "output_dir": str(output),
        "grid": str(output / files[0].name),
        "results_json": str(output / files[1].name),
        "num_prompts": len(prompts),
        "seeds": seeds,
        "scorers": labels,
        "models": models,
        "metrics": flat_metrics(results),
        "win_rate_per_seed": {
            f"{model}/{scorer}": stats["win_rate_per_seed"]
            for model, per_scorer in results.items()
            for scorer, stats in per_scorer.items()
            if "win_rate_per_seed" in stats
        },
    }


def _start_run(
    uri: str, cfg: RunConfig, base: Location, sources: list[ModelSource], labels: list[str]
) -> str:
    """A new MLflow run for this evaluation, with the eval/model config and model paths as params."""
    from ray_jobs import tracking

    exp_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    run = tracking.mlflow_client(uri).create_run(
        exp_id,
        run_name=f"{cfg.run.name}-eval",
        tags={"prefopt.command": "eval", "prefopt.family": cfg.model.family},
    )
    params = flatten({"eval": cfg.to_dict()["eval"], "model": cfg.to_dict()["model"]})
    params.update({"eval.baseline_dir": str(base), "eval.scorer_labels": ",".join(labels)})
    params.update({f"eval.model.{s.name}": str(s.path) for s in sources})
    tracking.log_params_once(uri, run.info.run_id, params)
    return run.info.run_id
