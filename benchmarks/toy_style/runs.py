"""The testbed's stages, each through the function its ``prefopt`` command runs: regenerate, cache, train, eval.

Every run shares ``configs/demo.yaml`` as the base config, ``<workdir>/mlflow.db`` as the tracking store and
one Ray session (started once by the caller with ``ray_jobs.cluster.ensure_ray``).

A finished training run is reused: :func:`train` writes its result beside the run (``RESULT_FILE``) with the
fingerprint of what defined it (the resolved config, the bytes of any file an extra override names, e.g.
the calibration, and the source of the packages that train, ``TRAINING_CODE``), and returns it instead of
training again while the fingerprint matches. A changed method, budget, hyperparameter or training code
trains afresh; delete the workdir to retrain everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from benchmarks.toy_style.methods import Budget, Method, hyperparameters
from pipelines.toy_prompts import STYLE_TEMPLATE, train_prompts
from pipelines.toy_sampling import EVAL_SETTINGS
from prefopt_core.config import RunConfig, load_config

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
#: A finished run's result and fingerprint, under ``<workdir>/<run name>/``.
RESULT_FILE = "testbed_result.json"
#: The packages whose code decides what a training run computes: their ``.py`` sources are fingerprinted.
TRAINING_CODE = ("prefopt_core", "ray_jobs", "pipelines")
#: Scorers of every evaluation: the style (adoption, win rate) and the fidelity to the prompt.
EVAL_SCORERS = "[{name: outline_style}, {name: color_accuracy}, {name: shape_accuracy}]"


def tracking_uri(workdir: Path) -> str:
    """The MLflow store every stage of a testbed run shares: ``<workdir>/mlflow.db``."""
    return f"sqlite:///{workdir / 'mlflow.db'}"


def run_config(workdir: Path, name: str, base_dir: Path, *overrides: str) -> RunConfig:
    """The demo config pointed at ``base_dir`` with its own workdir, run name and the shared MLflow store."""
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"run.workdir={workdir / name}",
            f"run.name={name}",
            f"model.pretrained={base_dir}",
            f"model.max_sequence_length={EVAL_SETTINGS.max_sequence_length}",
            "model.resolution=32",
            f"tracking.uri={tracking_uri(workdir)}",
            "tracking.experiment=toy-style",
            *overrides,
        ],
    )


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return path


def regenerate(
    workdir: Path,
    base_dir: Path,
    setting: str,
    budget: Budget,
) -> dict:
    """Setting A (Pick-Style: chosen from ``STYLE_TEMPLATE``, rejected from the plain prompt, same seed) or B
    (``pick-a-pic-like``: two seeds of the plain prompt, outline-scored, noisy labels, ties) pairs."""
    from ray_jobs.regenerate import run_regenerate

    name = f"pairs_{setting}"
    prompt_file = write_prompts(workdir / "prompts" / f"{name}.txt", train_prompts())
    if setting == "A":
        preset = [
            "regenerate.preset=custom",
            f"regenerate.chosen_template='{STYLE_TEMPLATE}'",
            "regenerate.rejected_template='{prompt}'",
            f"regenerate.pairs_per_prompt={budget.pairs_per_prompt}",
        ]
    else:
        preset = [
            "regenerate.preset=pick-a-pic-like",
            f"regenerate.pairs_per_prompt={budget.samples_per_prompt_b}",
        ]
    cfg = run_config(
        workdir,
        f"regenerate_{name}",
        base_dir,
        *preset,
        f"regenerate.prompts={prompt_file}",
        f"regenerate.output_dir={workdir / name}",
        f"regenerate.num_inference_steps={EVAL_SETTINGS.num_inference_steps}",
        f"regenerate.guidance_scale={EVAL_SETTINGS.guidance_scale}",
        "regenerate.batch_size=16",
        "regenerate.rows_per_shard=64",
    )
    return run_regenerate(cfg)


def cache(workdir: Path, base_dir: Path, setting: str) -> dict:
    """The latent cache of a setting's pairs (ties and broken rows quarantined, counted)."""
    from ray_jobs.cache import run_cache

    name = f"pairs_{setting}"
    cfg = run_config(
        workdir,
        f"cache_{name}",
        base_dir,
        f"data.source={workdir / name}",
        f"cache.dir={workdir / f'cache_{name}'}",
        "cache.rows_per_shard=64",
        "cache.batch_size=32",
    )
    return run_cache(cfg)


def train(
    workdir: Path,
    base_dir: Path,
    method: Method,
    seed: int,
    budget: Budget,
    *,
    hparams: dict | None = None,
    run_name: str | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """Train ``method`` with training seed ``seed`` from its setting's cache (``extra``: overrides after the
    method's own, e.g. the calibration file); returns time, export, metrics and the MLflow run id. A run
    that finished earlier with the same fingerprint is not trained again (its stored result)."""
    from ray_jobs.training.driver import run_training

    cfg = train_config(
        workdir, base_dir, method, seed, budget, hparams=hparams, run_name=run_name, extra=extra
    )
    run_name, result_file = cfg.run.name, cfg.workdir / RESULT_FILE
    fingerprint = run_fingerprint(cfg, extra)
    if result_file.is_file():
        stored = json.loads(result_file.read_text())
        if stored.get("fingerprint") == fingerprint:
            logger.info("testbed: %s finished earlier with this config; reusing its result", run_name)
            return {**stored["result"], "reused": True}
        # another config under the same name: its checkpoints must not be resumed
        logger.info("testbed: %s changed since it last ran; training it afresh", run_name)
        _discard_run(cfg)
    t0 = time.perf_counter()
    summary = run_training(cfg)
    result = {
        "seconds": time.perf_counter() - t0,
        "export": summary.export_dir,
        "steps": budget.max_steps,
        "beta": cfg.loss.beta,
        "lr": cfg.train.lr,
        "final": summary.final_metrics,
        "run_id": summary.mlflow_run_id,
        "method": method.name,
        "seed": seed,
    }
    result_file.write_text(json.dumps({"fingerprint": fingerprint, "result": result}, indent=1))
    return result


def train_config(
    workdir: Path,
    base_dir: Path,
    method: Method,
    seed: int,
    budget: Budget,
    *,
    hparams: dict | None = None,
    run_name: str | None = None,
    extra: tuple[str, ...] = (),
) -> RunConfig:
    """The config :func:`train` trains ``method`` with (run name ``<method>_s<seed>`` unless given: its own
    workdir, so a run resumes from the same name)."""
    hp = hparams or hyperparameters(method)[0]
    return run_config(
        workdir,
        run_name or f"{method.name}_s{seed}",
        base_dir,
        f"cache.dir={workdir / f'cache_pairs_{method.setting}'}",
        f"run.seed={seed}",
        f"loss.beta={hp['beta']}" if hp["beta"] else "loss.beta=null",
        f"train.lr={hp['lr']}",
        f"train.max_steps={budget.max_steps}",
        f"train.batch_size={budget.batch_size}",
        "train.num_workers=2",
        "train.zero_stage=2",
        "train.eval_every=20",
        "train.sample_prompts=4",
        f"train.sample_steps={EVAL_SETTINGS.num_inference_steps}",
        "train.warmup_steps=10",
        *method.overrides,
        *extra,
    )


def code_digest(root: Path = REPO) -> str:
    """sha256 of every ``.py`` file (path and bytes, in path order) of the ``TRAINING_CODE`` packages."""
    digest = hashlib.sha256()
    for package in TRAINING_CODE:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(cfg: RunConfig, extra: tuple[str, ...]) -> str:
    """sha256 of the resolved config, the training code (:func:`code_digest`) and the bytes of every file an
    ``extra`` override names."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    digest.update(code_digest().encode())
    for override in extra:
        value = Path(override.partition("=")[2])
        if value.is_file():
            digest.update(value.read_bytes())
    return digest.hexdigest()


def _discard_run(cfg: RunConfig) -> None:
    """Remove a run's workdir and mark its MLflow run deleted, so the next training starts from step 0 in a
    new MLflow run."""
    from ray_jobs import tracking
    from ray_jobs.training.driver import tracking_run_key

    client = tracking.mlflow_client(cfg.tracking_uri)
    run_key = tracking_run_key(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        found = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`{tracking.RUN_KEY_TAG}` = '{run_key}'"
        )
        for run in found:
            client.delete_run(run.info.run_id)
    shutil.rmtree(str(cfg.workdir), ignore_errors=True)


def evaluate(
    workdir: Path, base_dir: Path, exports: dict[str, str], prompts: list[str], seeds: int, name: str = "eval"
) -> dict:
    """``prefopt eval`` of every export against the base on ``prompts`` x ``range(seeds)``."""
    from ray_jobs.evaluate import run_eval

    prompt_file = write_prompts(workdir / "prompts" / f"{name}.txt", prompts)
    models = ",".join(f"{k}={v}" for k, v in exports.items())
    cfg = run_config(
        workdir,
        name,
        base_dir,
        f"eval.prompts={prompt_file}",
        f"eval.models=[{models}]",
        f"eval.seeds={list(range(seeds))}",
        f"eval.scorers={EVAL_SCORERS}",
        f"eval.num_inference_steps={EVAL_SETTINGS.num_inference_steps}",
        f"eval.guidance_scale={EVAL_SETTINGS.guidance_scale}",
        "eval.batch_size=16",
    )
    return run_eval(cfg)


def ddpm_counterpart(workdir: Path, method: Method, seed: int, budget: Budget, hparams: dict) -> dict:
    """The DDPM side of the timestep-imbalance figure: ``method`` (a setting-B method) trained the same way on a
    tiny SD1.5-family pipeline (DDPM schedule, random weights: no trained DDPM model ships offline) from the
    setting-B pairs, cached with that pipeline's VAE and text encoder. Returns what :func:`train` returns."""
    from prefopt_core.models.tiny import make_tiny_pipeline
    from ray_jobs.cache import run_cache

    base = make_tiny_pipeline(workdir / "ddpm_base", family="sd15", seed=0, resolution=32)
    cache_dir = workdir / "cache_pairs_B_ddpm"
    family = "model.family=sd15"
    cfg = run_config(
        workdir,
        "cache_pairs_B_ddpm",
        base,
        family,
        f"data.source={workdir / 'pairs_B'}",
        f"cache.dir={cache_dir}",
        "cache.rows_per_shard=64",
        "cache.batch_size=32",
    )
    run_cache(cfg)
    return train(
        workdir,
        base,
        method,
        seed,
        budget,
        hparams=hparams,
        run_name=f"{method.name}_ddpm_s{seed}",
        extra=(family, f"cache.dir={cache_dir}"),
    )
